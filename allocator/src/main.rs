use std::process::ExitCode;

use dropline_allocator::AllocatorConfig;

#[tokio::main]
async fn main() -> ExitCode {
    dropline::stage::main::<AllocatorConfig, _, _, _>(dropline_allocator::run).await
}
