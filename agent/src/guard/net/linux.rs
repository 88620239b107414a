//! The network guard's Linux enforcer: ending the sending process, and blocking a
//! destination with nftables.
//!
//! Blocks live in their own table, `inet weilan`: an output-hook chain rejects traffic
//! to addresses in two sets (`blocked4`, `blocked6`; TCP with a reset, so the sender
//! learns at once, anything else with ICMP admin-prohibited). Each block is a set
//! element with a timeout, so the kernel removes it on expiry — also while the agent is
//! stopped — and blocks survive an agent restart. The table is built through the
//! `nftables` crate (the `nft` JSON interface).

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use nftables::batch::Batch;
use nftables::expr::{Elem, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField};
use nftables::schema::{
    Chain, Element, NfListObject, Rule, Set, SetFlag, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Match, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::NetEnforcer;

/// The nftables table Weilan owns.
pub const NFT_TABLE: &str = "weilan";

/// The real enforcer: signals and nftables.
pub struct LinuxNetEnforcer;

impl NetEnforcer for LinuxNetEnforcer {
    fn kill(&self, pid: u32, exe: &str) -> Result<String, String> {
        crate::procinfo::terminate(pid, exe)
    }

    fn block(
        &self,
        netns: u64,
        addr: IpAddr,
        duration: Duration,
        rule_id: &str,
    ) -> Result<String, String> {
        let secs = duration.as_secs().clamp(1, u32::MAX as u64) as u32;
        let batch = block_batch(addr, secs, rule_id).to_nftables();
        let apply =
            move || nftables::helper::apply_ruleset(&batch).map_err(|e| format!("nft: {e}"));
        if Some(netns) == crate::procinfo::own_net_namespace() {
            apply()?;
        } else {
            // `nft` inherits the namespace of the thread that starts it.
            let file = crate::procinfo::net_namespaces()
                .remove(&netns)
                .ok_or_else(|| format!("network namespace {netns} is gone"))?;
            let ns = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            std::thread::spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("setns: {e}"))?;
                apply()
            })
            .join()
            .map_err(|_| "the nft thread panicked".to_string())??;
        }
        Ok(format!(
            "{addr} rejected for {secs} s (nft table inet {NFT_TABLE}, netns {netns})"
        ))
    }
}

fn set_name(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "blocked4"
    } else {
        "blocked6"
    }
}

/// The table, its sets and rules (idempotent: `add` keeps what exists, the chain is
/// flushed and refilled), and the new element.
pub fn block_batch(addr: IpAddr, secs: u32, rule_id: &str) -> Batch<'static> {
    let family = NfFamily::INet;
    let table: Cow<'static, str> = NFT_TABLE.into();
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(Table {
        family,
        name: table.clone(),
        handle: None,
    }));
    batch.add(NfListObject::Chain(Chain {
        family,
        table: table.clone(),
        name: "fence-out".into(),
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Output),
        prio: Some(0),
        policy: Some(NfChainPolicy::Accept),
        ..Default::default()
    }));
    for (name, ty) in [
        ("blocked4", SetType::Ipv4Addr),
        ("blocked6", SetType::Ipv6Addr),
    ] {
        batch.add(NfListObject::Set(Box::new(Set {
            family,
            table: table.clone(),
            name: name.into(),
            set_type: SetTypeValue::Single(ty),
            flags: Some(HashSet::from([SetFlag::Timeout])),
            ..Default::default()
        })));
    }
    batch.add_cmd(nftables::schema::NfCmd::Flush(
        nftables::schema::FlushObject::Chain(Chain {
            family,
            table: table.clone(),
            name: "fence-out".into(),
            ..Default::default()
        }),
    ));
    for (proto, set) in [("ip", "blocked4"), ("ip6", "blocked6")] {
        let daddr = || {
            Statement::Match(Match {
                left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                    PayloadField {
                        protocol: proto.into(),
                        field: "daddr".into(),
                    },
                ))),
                right: Expression::String(format!("@{set}").into()),
                op: Operator::EQ,
            })
        };
        let tcp = Statement::Match(Match {
            left: Expression::Named(NamedExpression::Meta(Meta {
                key: MetaKey::L4proto,
            })),
            right: Expression::String("tcp".into()),
            op: Operator::EQ,
        });
        for stmts in [
            vec![
                daddr(),
                tcp,
                Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
            ],
            vec![daddr(), Statement::Reject(Some(Reject::new(None, None)))],
        ] {
            batch.add(NfListObject::Rule(Rule {
                family,
                table: table.clone(),
                chain: "fence-out".into(),
                expr: stmts.into(),
                comment: Some("weilan: network rules' block-destination".into()),
                ..Default::default()
            }));
        }
    }
    batch.add(NfListObject::Element(Element {
        family,
        table,
        name: set_name(addr).into(),
        elem: vec![Expression::Named(NamedExpression::Elem(Elem {
            val: Box::new(Expression::String(addr.to_string().into())),
            timeout: Some(secs),
            expires: None,
            comment: Some(format!("rule {rule_id}").into()),
            counter: None,
        }))]
        .into(),
    }));
    batch
}
