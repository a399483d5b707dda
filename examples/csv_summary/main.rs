//! offload with a kind of your own: the whole engine (durable `202`, idempotency, progress over
//! WebSocket, webhooks, API keys, backpressure, scale-out) for `csv-summary` jobs beside the
//! built-in PDF and image kinds.
//!
//! ```sh
//! cargo run --release --example csv_summary -- --bind 127.0.0.1:8080
//! curl -s localhost:8080/jobs -H 'content-type: application/json' \
//!   -d '{"kind": "csv-summary", "input": {"csv": "item,price\na,1.5\nb,2.5\n", "columns": ["price"]}}'
//! ```
//!
//! Every flag of `offload --help` works; `--pdf-workers` sizes this kind's pool too.

mod kind;

use std::sync::Arc;

use clap::Parser;
use offload::configuration::Settings;
use offload::startup::{Application, KindRegistration};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let settings = Settings::parse();
    offload::telemetry::init(settings.server.log_format);
    let listener = std::net::TcpListener::bind(settings.server.bind)?;
    let workers = settings.pdf_workers();
    let summary = Arc::new(kind::CsvSummary { max_rows: 1_000_000 });
    let app = Application::with_kinds(settings, listener, vec![KindRegistration::json_only(summary, workers)])?;
    app.run_until_stopped().await
}
