use clap::Parser;
use dropline_expirer::ExpirerConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dropline::telemetry::init_logs();
    let config = ExpirerConfig::parse();
    let shutdown = dropline::shutdown::on_signals();
    dropline_expirer::run(config, shutdown).await?;
    Ok(())
}
