fn main() -> std::process::ExitCode {
    reverse_proxy::cli::main()
}
