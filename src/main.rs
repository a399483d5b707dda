use clap::Parser;
use offload::configuration::Settings;
use offload::startup::Application;
use offload::telemetry;

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let settings = Settings::parse();
    if settings.healthcheck {
        std::process::exit(if offload::healthcheck::probe(settings.bind) { 0 } else { 1 });
    }
    telemetry::init(settings.log_format);
    let app = Application::build(settings).await?;
    app.run_until_stopped().await
}
