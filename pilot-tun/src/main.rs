//! `pilot-tun`: see `pilot-tun --help`.

fn main() -> std::process::ExitCode {
    pilot_tun::cli::main()
}
