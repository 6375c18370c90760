use std::process::ExitCode;

use dropline_settler::SettlerConfig;

#[tokio::main]
async fn main() -> ExitCode {
    dropline::stage::main::<SettlerConfig, _, _, _>(dropline_settler::run).await
}
