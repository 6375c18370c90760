use clap::Parser;
use dropline_ingress::IngressConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dropline::telemetry::init_logs();
    let config = IngressConfig::parse();
    let shutdown = dropline::shutdown::on_signals();
    dropline_ingress::run(config, shutdown).await?;
    Ok(())
}
