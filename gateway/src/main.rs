use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=off".into()),
        )
        .init();
    gridsense_gateway::cli::run(gridsense_gateway::cli::Cli::parse()).await
}
