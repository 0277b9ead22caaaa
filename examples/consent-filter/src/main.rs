//! `consent-gateway`: caregate with the `consent` filter kind. The same command line as
//! `caregate` (`run`, `check`, `demo`, `audit verify`, `sandbox`); `check` validates `kind:
//! consent` like a built-in kind.

/// The allocator caregate is measured with (benches/RESULTS.md): a library cannot choose it for
/// the binary, so the binary declares it.
#[global_allocator]
static GLOBAL: caregate::Allocator = caregate::Allocator;

fn main() -> std::process::ExitCode {
    caregate::App::builder()
        .name("consent-gateway")
        .filter_kind(consent_filter::KIND, consent_filter::build)
        .main()
}
