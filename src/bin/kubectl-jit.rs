//! The `kubectl-jit` binary (`kubectl jit` once on the PATH): see [`portcullis::plugin`].

fn main() -> std::process::ExitCode {
    portcullis::plugin::main()
}
