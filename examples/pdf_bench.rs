//! The raw PDF loop: the service's own PDF code (`kinds::pdf::render::render`) called in a plain loop on
//! every core, no HTTP, no actors — the baseline the service's completed jobs/s is compared with.
//!
//! `cargo run --release --example pdf_bench -- [PAGES] [JOBS] [THREADS]`
//! PAGES: 1 draws the peers' one-page document (title + 40 rows × 5 columns); N draws 40·N rows.
//! Prints one JSON line: pages, jobs, threads, wall_s, jobs_per_s, mean_ms (per job, per thread).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use offload::kinds::pdf::render::render;
use offload::kinds::pdf::spec::{DocumentSpec, PdfRequest, RenderBudget, SpecLimits};
use offload::workers::JobContext;

/// The service's default render budget.
const BUDGET: RenderBudget = RenderBudget { max_pages: 1000, max_lines: 200_000 };

/// The service's allocator (src/main.rs), so that the ratio compares like with like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The body `bench/peers.sh body PAGES` prints: the peers' document.
fn body(pages: usize) -> serde_json::Value {
    let rows: Vec<Vec<String>> = (1..=40 * pages)
        .map(|n| {
            let qty = (n * 7) % 13 + 1;
            let price = ((n * 37) % 1000) as f64 / 10.0 + 1.0;
            vec![
                n.to_string(),
                format!("Widget {n}"),
                qty.to_string(),
                format!("{price:.2}"),
                format!("{:.2}", qty as f64 * price),
            ]
        })
        .collect();
    let title = if pages == 1 { "Benchmark report - page 1/1" } else { "Benchmark report" };
    serde_json::json!({
        "title": title,
        "table": {"columns": ["#", "Item", "Qty", "Unit price", "Total"], "rows": rows},
        "page_size": "A4"
    })
}

fn main() {
    offload::process::disable_huge_pages();
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let pages = args.first().copied().unwrap_or(1);
    let jobs = args.get(1).copied().unwrap_or(if pages == 1 { 500 } else { 50 });
    let threads = args.get(2).copied().unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let limits = SpecLimits { max_rows: 100_000, max_columns: 50, max_cell_chars: 1000, render: BUDGET };
    let spec = || {
        let req: PdfRequest = serde_json::from_value(body(pages)).unwrap();
        DocumentSpec::parse(req, &limits).unwrap()
    };
    // Warm up (page metrics, allocator) outside the timing.
    render(&spec(), BUDGET, &mut JobContext::detached()).expect("renders");
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let busy_ms: f64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut busy = 0.0;
                    while next.fetch_add(1, Ordering::Relaxed) < jobs {
                        // Parse included: the service parses each request too (on an HTTP thread).
                        let t = Instant::now();
                        let pdf = render(&spec(), BUDGET, &mut JobContext::detached()).expect("renders");
                        assert!(pdf.bytes.starts_with(b"%PDF"));
                        busy += t.elapsed().as_secs_f64() * 1000.0;
                    }
                    busy
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let wall = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "pages": pages, "jobs": jobs, "threads": threads, "wall_s": (wall * 1000.0).round() / 1000.0,
            "jobs_per_s": (jobs as f64 / wall * 10.0).round() / 10.0,
            "mean_ms": (busy_ms / jobs as f64 * 100.0).round() / 100.0,
        })
    );
}
