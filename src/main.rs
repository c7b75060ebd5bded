//! The `limitless` command; see `limitless --help`.
fn main() {
    std::process::exit(limitless::cli::main());
}
