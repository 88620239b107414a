//! The MQTT topic scheme, versioned under `weilan/v1/`.
//!
//! | topic                                  | direction          | payload                         |
//! |----------------------------------------|--------------------|---------------------------------|
//! | `weilan/v1/agents/{id}/events`         | agent → collector  | signed [`crate::wire::Batch`]   |
//! | `weilan/v1/agents/{id}/status`         | agent → collector  | [`crate::wire::Status`] (retained, also the last will) |
//! | `weilan/v1/agents/{id}/acks`           | collector → agent  | signed [`crate::wire::Ack`]     |
//! | `weilan/v1/agents/{id}/commands`       | collector → agent  | signed [`crate::wire::Command`] |
//! | `weilan/v1/policy`                     | collector → agents | signed [`crate::wire::PolicyPush`] (retained) |
//! | `weilan/v1/doors/{id}/events`          | door controller → collector | signed [`crate::wire::DoorMessage`] |
//! | `weilan/v1/collectors/{id}/presence`   | collector → agents | signed [`crate::wire::Presence`] (retained, also the last will) |
//! | `weilan/v1/federation/{district}/batches/{id}` | district collector → province collector | agent `id`'s signed [`crate::wire::Batch`], verbatim |
//! | `weilan/v1/federation/{district}/acks`    | province collector → district collector | signed [`crate::wire::Ack`] |
//!
//! The agent id is the common name of the agent's client certificate. It is restricted
//! to `[A-Za-z0-9._-]{1,64}` so it can never contain MQTT wildcards or separators.

/// Prefix of every Weilan topic; the version changes only with an incompatible scheme.
pub const PREFIX: &str = "weilan/v1";

/// The fence policy for every agent: signed by the collector, retained.
pub const POLICY: &str = "weilan/v1/policy";

/// Every collector's presence (one topic per collector client id, so that several
/// collectors sharing the ingest each announce themselves).
pub const PRESENCE_FILTER: &str = "weilan/v1/collectors/+/presence";

/// Whether collector `id` is subscribed: signed by it, retained.
pub fn collector_presence(id: &str) -> String {
    format!("{PREFIX}/collectors/{id}/presence")
}

/// The collector id of a presence topic.
pub fn parse_presence_topic(topic: &str) -> Option<&str> {
    let id = topic
        .strip_prefix(PREFIX)?
        .strip_prefix("/collectors/")?
        .strip_suffix("/presence")?;
    valid_agent_id(id).then_some(id)
}

/// The four per-agent channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Events,
    Status,
    Acks,
    Commands,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Events => "events",
            Channel::Status => "status",
            Channel::Acks => "acks",
            Channel::Commands => "commands",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "events" => Channel::Events,
            "status" => Channel::Status,
            "acks" => Channel::Acks,
            "commands" => Channel::Commands,
            _ => return None,
        })
    }
}

/// The topic of `channel` for `agent_id`.
pub fn agent_topic(agent_id: &str, channel: Channel) -> String {
    format!("{PREFIX}/agents/{agent_id}/{}", channel.as_str())
}

/// Subscription filter matching `channel` for every agent.
pub fn all_agents_filter(channel: Channel) -> String {
    format!("{PREFIX}/agents/+/{}", channel.as_str())
}

/// `filter` as a member of the shared-subscription group `group`: the broker hands
/// each matching message to one member of the group (several collectors sharing the
/// ingest). Messages still arrive on their own topic, without the prefix.
pub fn shared(group: &str, filter: &str) -> String {
    format!("$share/{group}/{filter}")
}

/// Splits a per-agent topic into agent id and channel; `None` if it is not one of ours.
pub fn parse_agent_topic(topic: &str) -> Option<(&str, Channel)> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/agents/")?;
    let (agent, channel) = rest.split_once('/')?;
    if !valid_agent_id(agent) {
        return None;
    }
    Some((agent, Channel::parse(channel)?))
}

/// Subscription filter for every door controller's events.
pub const DOORS_FILTER: &str = "weilan/v1/doors/+/events";

/// The events topic of door controller `id`.
pub fn door_topic(id: &str) -> String {
    format!("{PREFIX}/doors/{id}/events")
}

/// Where the collector acknowledges door controller `id`'s stored events.
pub fn door_ack_topic(id: &str) -> String {
    format!("{PREFIX}/doors/{id}/acks")
}

/// The controller id of a door controller's events topic.
pub fn parse_door_topic(topic: &str) -> Option<&str> {
    let id = topic
        .strip_prefix(PREFIX)?
        .strip_prefix("/doors/")?
        .strip_suffix("/events")?;
    valid_agent_id(id).then_some(id)
}

/// Every district's forwarded batches (the province collector subscribes).
pub const FEDERATION_FILTER: &str = "weilan/v1/federation/+/batches/+";

/// Where district `district` forwards agent `agent_id`'s signed batches to the
/// province (one topic per agent, so the province serves agents by turns).
pub fn federation_batches(district: &str, agent_id: &str) -> String {
    format!("{PREFIX}/federation/{district}/batches/{agent_id}")
}

/// Where the province acknowledges district `district`'s forwarded batches.
pub fn federation_acks(district: &str) -> String {
    format!("{PREFIX}/federation/{district}/acks")
}

/// The district and agent of a forwarded-batches topic.
pub fn parse_federation_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/federation/")?;
    let (district, agent) = rest.split_once("/batches/")?;
    (valid_agent_id(district) && valid_agent_id(agent)).then_some((district, agent))
}

/// Agent ids are certificate common names restricted to a safe alphabet.
pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !id.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let t = agent_topic("ws-01", Channel::Events);
        assert_eq!(t, "weilan/v1/agents/ws-01/events");
        assert_eq!(parse_agent_topic(&t), Some(("ws-01", Channel::Events)));
        assert_eq!(parse_agent_topic("weilan/v1/agents/+/events"), None);
        assert_eq!(parse_agent_topic("weilan/v1/agents/a/b/events"), None);
        assert_eq!(parse_agent_topic("weilan/v2/agents/a/events"), None);
        let f = federation_batches("weilan-district-east", "ws-01");
        assert_eq!(
            parse_federation_topic(&f),
            Some(("weilan-district-east", "ws-01"))
        );
        assert_eq!(parse_federation_topic(FEDERATION_FILTER), None);
        assert_eq!(
            parse_federation_topic("weilan/v1/federation/d/batches/a/b"),
            None
        );
        assert_eq!(parse_federation_topic(&federation_acks("d")), None);
        assert_eq!(parse_agent_topic(&f), None);
        let p = collector_presence("weilan-collector");
        assert_eq!(p, "weilan/v1/collectors/weilan-collector/presence");
        assert_eq!(parse_presence_topic(&p), Some("weilan-collector"));
        assert_eq!(parse_presence_topic(PRESENCE_FILTER), None);
    }

    #[test]
    fn agent_ids_cannot_carry_wildcards_or_separators() {
        for bad in ["", "a/b", "+", "#", "a b", ".hidden", &"x".repeat(65)] {
            assert!(!valid_agent_id(bad), "{bad:?}");
        }
        assert!(valid_agent_id("finance-ws-01.example_1"));
    }
}
