use std::process::ExitCode;

use dropline_notifier::NotifierConfig;

#[tokio::main]
async fn main() -> ExitCode {
    dropline::stage::main::<NotifierConfig, _, _, _>(dropline_notifier::run).await
}
