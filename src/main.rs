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
        std::process::exit(if offload::healthcheck::probe(settings.bind) { 0 } else { 1 });
    }
    telemetry::init(settings.log_format);
    let app = Application::build(settings).await?;
    app.run_until_stopped().await
}
