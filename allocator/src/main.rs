use clap::Parser;
use dropline_allocator::AllocatorConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dropline::telemetry::init_logs();
    let config = AllocatorConfig::parse();
    let shutdown = dropline::shutdown::on_signals();
    dropline_allocator::run(config, shutdown).await?;
    Ok(())
}
