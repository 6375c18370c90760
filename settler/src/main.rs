use clap::Parser;
use dropline_settler::SettlerConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dropline::telemetry::init_logs();
    let config = SettlerConfig::parse();
    let shutdown = dropline::shutdown::on_signals();
    dropline_settler::run(config, shutdown).await?;
    Ok(())
}
