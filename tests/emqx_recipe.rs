//! The EMQX recipe (docs/deployment.md §11, `config/emqx/`): no EMQX runs here (it
//! is in none of the registries this machine reaches), so its access model is checked
//! by reading `acl.conf` as EMQX does — Erlang terms, each ending with a period,
//! matched from the top, first match decides, `${username}` the certificate's name,
//! `+`/`#` wildcards, `{re, …}` user patterns — against the same cases the shipped
//! Mosquitto ACL is held to: every agent only itself, every collector of a shared
//! group the whole fleet. With Erlang's `erl` installed the file is also read by
//! `file:consult`, the reader EMQX uses.

use std::path::Path;

/// An Erlang term, as much of the syntax as `acl.conf` may use.
#[derive(Debug, Clone, PartialEq)]
enum Term {
    Atom(String),
    Str(String),
    Tuple(Vec<Term>),
    List(Vec<Term>),
}

struct Parser<'a> {
    text: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip(&mut self) {
        while self.at < self.text.len() {
            match self.text[self.at] {
                b' ' | b'\n' | b'\t' | b'\r' => self.at += 1,
                b'%' => {
                    while self.at < self.text.len() && self.text[self.at] != b'\n' {
                        self.at += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        self.skip();
        if self.text.get(self.at) == Some(&c) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected `{}` at byte {}", c as char, self.at))
        }
    }

    fn term(&mut self) -> Result<Term, String> {
        self.skip();
        match self.text.get(self.at) {
            Some(b'{') => Ok(Term::Tuple(self.sequence(b'{', b'}')?)),
            Some(b'[') => Ok(Term::List(self.sequence(b'[', b']')?)),
            Some(b'"') => {
                self.at += 1;
                let start = self.at;
                while self.text.get(self.at).is_some_and(|&c| c != b'"') {
                    if self.text[self.at] == b'\\' {
                        return Err(format!("escape at byte {}: not used here", self.at));
                    }
                    self.at += 1;
                }
                let s = String::from_utf8(self.text[start..self.at].to_vec()).unwrap();
                self.expect(b'"')?;
                Ok(Term::Str(s))
            }
            Some(c) if c.is_ascii_lowercase() => {
                let start = self.at;
                while self
                    .text
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    self.at += 1;
                }
                Ok(Term::Atom(
                    String::from_utf8(self.text[start..self.at].to_vec()).unwrap(),
                ))
            }
            other => Err(format!(
                "unexpected {:?} at byte {}",
                other.map(|c| *c as char),
                self.at
            )),
        }
    }

    fn sequence(&mut self, open: u8, close: u8) -> Result<Vec<Term>, String> {
        self.expect(open)?;
        let mut items = Vec::new();
        self.skip();
        if self.text.get(self.at) == Some(&close) {
            self.at += 1;
            return Ok(items);
        }
        loop {
            items.push(self.term()?);
            self.skip();
            match self.text.get(self.at) {
                Some(b',') => self.at += 1,
                Some(c) if *c == close => {
                    self.at += 1;
                    return Ok(items);
                }
                _ => {
                    return Err(format!(
                        "expected `,` or `{}` at byte {}",
                        close as char, self.at
                    ))
                }
            }
        }
    }

    /// Every `Term.` of the file, as `file:consult` reads it.
    fn consult(text: &str) -> Result<Vec<Term>, String> {
        let mut p = Parser {
            text: text.as_bytes(),
            at: 0,
        };
        let mut terms = Vec::new();
        loop {
            p.skip();
            if p.at >= p.text.len() {
                return Ok(terms);
            }
            terms.push(p.term()?);
            p.expect(b'.')?;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Publish,
    Subscribe,
}

/// MQTT topic matching: `filter` (with `+`/`#`) against `topic` level by level; a
/// subscription is allowed when the rule's topic covers the requested filter.
fn matches(filter: &str, topic: &str) -> bool {
    let (f, t): (Vec<&str>, Vec<&str>) = (filter.split('/').collect(), topic.split('/').collect());
    for (i, level) in f.iter().enumerate() {
        match *level {
            "#" => return true,
            "+" if i < t.len() => {}
            l if t.get(i) == Some(&l) => {}
            _ => return false,
        }
    }
    f.len() == t.len()
}

fn who_matches(who: &Term, user: &str) -> bool {
    match who {
        Term::Atom(a) if a == "all" => true,
        Term::Tuple(t) => match t.as_slice() {
            [Term::Atom(k), Term::Str(name)] if k == "username" || k == "user" => name == user,
            [Term::Atom(k), Term::Tuple(re)] if k == "username" || k == "user" => {
                match re.as_slice() {
                    [Term::Atom(r), Term::Str(pattern)] if r == "re" => {
                        regex::Regex::new(pattern).unwrap().is_match(user)
                    }
                    other => panic!("unknown user pattern {other:?}"),
                }
            }
            other => panic!("unknown subject {other:?}"),
        },
        other => panic!("unknown subject {other:?}"),
    }
}

/// The first rule that matches decides; nothing matches: denied (no_match = deny).
fn allowed(rules: &[Term], user: &str, action: Action, topic: &str) -> bool {
    for rule in rules {
        let Term::Tuple(parts) = rule else {
            panic!("rule {rule:?} is not a tuple")
        };
        match parts.as_slice() {
            [Term::Atom(permission), Term::Atom(all)] if all == "all" => {
                return permission == "allow";
            }
            [Term::Atom(permission), who, Term::Atom(act), Term::List(topics)] => {
                let act_matches = match act.as_str() {
                    "publish" => action == Action::Publish,
                    "subscribe" => action == Action::Subscribe,
                    "all" | "pubsub" => true,
                    other => panic!("unknown action {other}"),
                };
                let topic_matches = topics.iter().any(|t| match t {
                    Term::Str(pattern) => matches(&pattern.replace("${username}", user), topic),
                    other => panic!("unknown topic form {other:?}"),
                });
                if act_matches && who_matches(who, user) && topic_matches {
                    return permission == "allow";
                }
            }
            other => panic!("unknown rule {other:?}"),
        }
    }
    false
}

fn acl() -> Vec<Term> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/emqx/acl.conf");
    let text = std::fs::read_to_string(&path).unwrap();
    Parser::consult(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_agent_only_itself_every_collector_of_the_group_the_whole_fleet() {
    use Action::*;
    let rules = acl();
    let cases: &[(&str, Action, &str, bool)] = &[
        // An agent: its own events and status out, its own acks and commands in, the
        // policy and the collectors' presence in; nothing of another agent.
        ("ws-01", Publish, "weilan/v1/agents/ws-01/events", true),
        ("ws-01", Publish, "weilan/v1/agents/ws-01/status", true),
        ("ws-01", Subscribe, "weilan/v1/agents/ws-01/acks", true),
        ("ws-01", Subscribe, "weilan/v1/agents/ws-01/commands", true),
        ("ws-01", Subscribe, "weilan/v1/policy", true),
        ("ws-01", Subscribe, "weilan/v1/collectors/+/presence", true),
        ("ws-01", Publish, "weilan/v1/agents/ws-02/events", false),
        ("ws-01", Subscribe, "weilan/v1/agents/ws-02/acks", false),
        ("ws-01", Subscribe, "weilan/v1/agents/+/events", false),
        (
            "ws-01",
            Subscribe,
            "$share/weilan/weilan/v1/agents/+/events",
            false,
        ),
        ("ws-01", Subscribe, "#", false),
        ("ws-01", Publish, "weilan/v1/agents/ws-01/acks", false),
        ("ws-01", Publish, "weilan/v1/agents/ws-02/commands", false),
        ("ws-01", Publish, "weilan/v1/policy", false),
        (
            "ws-01",
            Publish,
            "weilan/v1/collectors/weilan-collector/presence",
            false,
        ),
        // A door controller: its own events out, its own acks in.
        ("door-1", Publish, "weilan/v1/doors/door-1/events", true),
        ("door-1", Subscribe, "weilan/v1/doors/door-1/acks", true),
        ("door-1", Publish, "weilan/v1/doors/door-2/events", false),
        // Every collector of the group: the fleet's events as a group member, acks,
        // commands and the policy out, only its own presence.
        (
            "weilan-collector",
            Subscribe,
            "$share/weilan/weilan/v1/agents/+/events",
            true,
        ),
        (
            "weilan-collector",
            Subscribe,
            "weilan/v1/agents/+/events",
            true,
        ),
        (
            "weilan-collector-b",
            Subscribe,
            "$share/weilan/weilan/v1/agents/+/events",
            true,
        ),
        (
            "weilan-collector-b",
            Subscribe,
            "$share/weilan/weilan/v1/agents/+/status",
            true,
        ),
        (
            "weilan-collector-b",
            Subscribe,
            "$share/weilan/weilan/v1/doors/+/events",
            true,
        ),
        (
            "weilan-collector-b",
            Publish,
            "weilan/v1/agents/ws-01/acks",
            true,
        ),
        (
            "weilan-collector-b",
            Publish,
            "weilan/v1/agents/ws-01/commands",
            true,
        ),
        (
            "weilan-collector-b",
            Publish,
            "weilan/v1/doors/door-1/acks",
            true,
        ),
        ("weilan-collector-b", Publish, "weilan/v1/policy", true),
        (
            "weilan-collector-b",
            Publish,
            "weilan/v1/collectors/weilan-collector-b/presence",
            true,
        ),
        (
            "weilan-collector-b",
            Publish,
            "weilan/v1/collectors/weilan-collector/presence",
            false,
        ),
        (
            "weilan-collector-b",
            Publish,
            "weilan/v1/agents/ws-01/events",
            false,
        ),
        ("weilan-collector-b", Subscribe, "#", false),
        // A province's collector reads what districts forward and acks it; a
        // district writes only its own batches and reads only its own acks.
        (
            "weilan-collector-b",
            Subscribe,
            "$share/weilan/weilan/v1/federation/+/batches/+",
            true,
        ),
        (
            "weilan-collector",
            Publish,
            "weilan/v1/federation/weilan-district-east/acks",
            true,
        ),
        (
            "weilan-district-east",
            Publish,
            "weilan/v1/federation/weilan-district-east/batches/ws-01",
            true,
        ),
        (
            "weilan-district-east",
            Subscribe,
            "weilan/v1/federation/weilan-district-east/acks",
            true,
        ),
        (
            "weilan-district-east",
            Publish,
            "weilan/v1/federation/weilan-district-west/batches/ws-01",
            false,
        ),
        (
            "weilan-district-east",
            Subscribe,
            "weilan/v1/federation/+/batches/+",
            false,
        ),
        (
            "weilan-district-east",
            Publish,
            "weilan/v1/federation/weilan-district-east/acks",
            false,
        ),
        (
            "weilan-district-east",
            Publish,
            "weilan/v1/agents/ws-01/events",
            false,
        ),
        (
            "ws-01",
            Publish,
            "weilan/v1/federation/ws-01/batches/ws-01",
            false,
        ),
        // A name that only looks like a collector's.
        (
            "weilan-collectorx",
            Subscribe,
            "weilan/v1/agents/+/events",
            false,
        ),
        (
            "x-weilan-collector",
            Subscribe,
            "weilan/v1/agents/+/events",
            false,
        ),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(user, action, topic, expected)| {
            allowed(&rules, user, *action, topic) != *expected
        })
        .map(|(user, action, topic, expected)| {
            format!(
                "{user} {action:?} {topic}: expected {}",
                if *expected { "allowed" } else { "denied" }
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "config/emqx/acl.conf:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn erlang_reads_the_acl_file_as_emqx_does() {
    let Some(erl) = ["/usr/bin/erl", "/usr/local/bin/erl"]
        .iter()
        .find(|p| Path::new(p).exists())
    else {
        println!("SKIPPED: no `erl` (Erlang) to read config/emqx/acl.conf with file:consult");
        return;
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/emqx/acl.conf");
    let out = std::process::Command::new(erl)
        .args(["-noshell", "-eval"])
        .arg(format!(
            "case file:consult(\"{}\") of {{ok, T}} -> io:format(\"~p~n\", [length(T)]), halt(0); E -> io:format(\"~p~n\", [E]), halt(1) end.",
            path.display()
        ))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "file:consult: {said}");
    assert_eq!(
        said.trim(),
        acl().len().to_string(),
        "Erlang and the test read as many rules"
    );
}

#[test]
fn the_recipe_names_what_the_collectors_and_agents_rely_on() {
    let hocon = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/emqx/weilan.hocon"),
    )
    .unwrap();
    for line in [
        "verify = verify_peer",
        "fail_if_no_peer_cert = true",
        "peer_cert_as_username = cn",
        "peer_cert_as_clientid = cn",
        "shared_subscription_strategy = hash_clientid",
        "no_match = deny",
        "path = \"/etc/emqx/acl.conf\"",
        "listeners.tcp.default.enable = false",
    ] {
        assert!(
            hocon.contains(line),
            "config/emqx/weilan.hocon lacks `{line}`"
        );
    }
    // The group the recipe's ACL admits is the one the documented settings name.
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/deployment.md"))
            .unwrap();
    assert!(doc.contains("shared_group = \"weilan\""));
}
