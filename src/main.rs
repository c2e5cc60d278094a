fn main() {
    std::process::exit(chainfs::cli::main())
}
