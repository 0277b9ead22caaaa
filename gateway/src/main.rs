//! The `caregate` command: [`caregate::App`] with the built-in filter kinds only. A binary with
//! kinds of its own is the same few lines plus `.filter_kind(...)` (see
//! docs/writing-a-filter.md).

/// mimalloc instead of the system allocator (see [`caregate::Allocator`]; measured in
/// benches/RESULTS.md).
#[global_allocator]
static GLOBAL: caregate::Allocator = caregate::Allocator;

fn main() -> std::process::ExitCode {
    caregate::App::builder().main()
}
