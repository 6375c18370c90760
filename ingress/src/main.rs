use std::process::ExitCode;

use dropline_ingress::IngressConfig;

#[tokio::main]
async fn main() -> ExitCode {
    dropline::stage::main::<IngressConfig, _, _, _>(dropline_ingress::run).await
}
