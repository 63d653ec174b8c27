//! `shoal node revoke`: stop trusting a node at once.

use crate::cmd_status::{AdminTarget, admin};
use anyhow::Result;
use clap::{Args, Subcommand};
use shoal_proto::v1;

/// `shoal node …`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Revoke a node: every certificate naming it is refused on every later call, it is
    /// declared dead, and agents refuse it on their own links.
    Revoke(RevokeArgs),
}

/// Arguments of `shoal node revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The node.
    pub node: String,
    #[command(flatten)]
    pub target: AdminTarget,
}

/// Runs `shoal node …`.
pub fn run(cmd: NodeCommand) -> Result<()> {
    let NodeCommand::Revoke(args) = cmd;
    crate::runtime()?.block_on(async {
        let mut admin = admin(&args.target).await?;
        let r = admin
            .revoke_node(v1::RevokeNodeRequest {
                node_id: args.node.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        println!(
            "{} {} · {} certificate serial(s) refused",
            args.node,
            if r.newly_revoked {
                "is revoked"
            } else {
                "was revoked already"
            },
            r.revoked_serials.len()
        );
        Ok(())
    })
}
