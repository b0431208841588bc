//! Command-line interface of the `gridsense` binary.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use gridsense_protocol::{DeviceKey, Direction, Downlink, RawFrame, Uplink};

/// gridsense: the sensor side of a city's grid-governance platform.
#[derive(Debug, Parser)]
#[command(name = "gridsense", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Walk through the wire protocol: genuine and hostile frames and the gateway's verdicts.
    Demo,
    /// Inspect frames.
    #[command(subcommand)]
    Frame(FrameCommand),
}

/// `gridsense frame …`
#[derive(Debug, Subcommand)]
pub enum FrameCommand {
    /// Decode a frame given in hex; with --key, verify its tag and decode its body.
    Decode {
        /// The frame as hex digits (spaces allowed).
        frame: String,
        /// The device key as 32 hex digits (or set GRIDSENSE_KEY).
        #[arg(long, env = "GRIDSENSE_KEY", hide_env_values = true)]
        key: Option<String>,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo => {
            print!("{}", crate::demo::render(&crate::demo::run()));
            Ok(())
        }
        Command::Frame(FrameCommand::Decode { frame, key }) => {
            print!("{}", decode_frame(&frame, key.as_deref())?);
            Ok(())
        }
    }
}

/// Decodes a hex frame into a readable description.
pub fn decode_frame(frame_hex: &str, key_hex: Option<&str>) -> Result<String> {
    let digits: String = frame_hex.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = hex::decode(&digits).context("the frame is not hex digits")?;
    let raw = RawFrame::parse(&bytes).context("the frame's envelope is invalid")?;
    let header = raw.header();
    let mut out = format!(
        "direction: {}\neui: {}\ncounter: {}\nbody: {} bytes\n",
        header.direction.as_str(),
        header.eui,
        header.counter,
        raw.body().len()
    );
    let Some(key_hex) = key_hex else {
        out.push_str("tag: not checked (no --key)\n");
        return Ok(out);
    };
    let key = DeviceKey::from_hex(key_hex).context("--key")?;
    let verified = match raw.verify(&key) {
        Ok(v) => v,
        Err(e) => bail!("{e}"),
    };
    out.push_str("tag: ok\n");
    let message = match header.direction {
        Direction::Uplink => format!("{:#?}", verified.decode::<Uplink>()?),
        Direction::Downlink => format!("{:#?}", verified.decode::<Downlink>()?),
    };
    out.push_str("message: ");
    out.push_str(&message);
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use gridsense_protocol::{Eui, examples, seal};

    use super::*;

    #[test]
    fn decodes_and_verifies_a_frame() {
        let key = DeviceKey::from_bytes([0xab; 16]);
        let frame = seal(Eui(0x42), 9, &examples::downlinks()[1], &key);
        let text = decode_frame(&hex::encode(&frame), Some(&"ab".repeat(16))).expect("decodes");
        assert!(text.contains("direction: down"), "{text}");
        assert!(text.contains("eui: 0000000000000042"), "{text}");
        assert!(text.contains("TimeSync"), "{text}");
        let err = decode_frame(&hex::encode(&frame), Some(&"cd".repeat(16))).expect_err("bad key");
        assert!(err.to_string().contains("tag does not verify"), "{err}");
        let unchecked = decode_frame(&hex::encode(&frame), None).expect("header only");
        assert!(unchecked.contains("not checked"), "{unchecked}");
        let err = decode_frame("zz", None).expect_err("not hex");
        assert!(err.to_string().contains("not hex"), "{err}");
    }
}
