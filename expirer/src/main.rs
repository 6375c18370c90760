use std::process::ExitCode;

use dropline_expirer::ExpirerConfig;

#[tokio::main]
async fn main() -> ExitCode {
    dropline::stage::main::<ExpirerConfig, _, _, _>(dropline_expirer::run).await
}
