// The settler's run future nests deeply (batch loop, reconciler, rebuild);
// its layout needs more than the default query depth.
#![recursion_limit = "256"]

use std::process::ExitCode;

use dropline_settler::SettlerConfig;

#[tokio::main]
async fn main() -> ExitCode {
    dropline::stage::main::<SettlerConfig, _, _, _>(dropline_settler::run).await
}
