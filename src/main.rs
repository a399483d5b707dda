use clap::Parser;
use offload::configuration::Settings;
use offload::startup::Application;
use offload::telemetry;

/// mimalloc instead of glibc malloc: requests are parsed on HTTP threads and freed on others,
/// and PDF building allocates many small objects (see the note on the dependency in Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    offload::process::disable_huge_pages();
    let settings = Settings::parse();
    if settings.healthcheck {
        std::process::exit(if offload::healthcheck::probe(settings.server.bind) { 0 } else { 1 });
    }
    telemetry::init(settings.server.log_format);
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(e) => {
            // E.g. the data directory is in use, or the port is taken: say so plainly.
            tracing::error!("cannot start: {e}");
            eprintln!("offload: cannot start: {e}");
            std::process::exit(1);
        }
    };
    app.run_until_stopped().await
}
