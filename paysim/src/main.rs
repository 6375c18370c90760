use clap::Parser;
use dropline_paysim::PaysimConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dropline::telemetry::init_logs();
    let config = PaysimConfig::parse();
    let shutdown = dropline::shutdown::on_signals();
    let running = dropline_paysim::start(config, shutdown).await?;
    running.task.await?;
    Ok(())
}
