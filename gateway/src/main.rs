use clap::Parser;

fn main() -> anyhow::Result<()> {
    gridsense_gateway::cli::run(gridsense_gateway::cli::Cli::parse())
}
