//! The resource's status as a pure function of what the server reports about the owned
//! objects: no guess, no timer. Readiness comes from the Deployments' and the DaemonSet's own
//! status, which the kubelets' Pod readiness feeds.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kvtier_api::crd::{KVCachedInference, KVCachedInferenceStatus};

use crate::objects;

/// Condition types.
pub const READY: &str = "Ready";
/// The owned objects are rolling out.
pub const PROGRESSING: &str = "Progressing";
/// Serving below what the spec asks, or the operator cannot apply it.
pub const DEGRADED: &str = "Degraded";
/// The spec passed the operator's checks.
pub const CONFIG_VALID: &str = "ConfigValid";
/// The remote tier's store accepts connections (only with a remote tier).
pub const REMOTE_REACHABLE: &str = "RemoteTierReachable";

/// What the server reports about the owned objects (`None`: not there).
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The engine Deployment.
    pub engine: Option<Deployment>,
    /// The router Deployment.
    pub router: Option<Deployment>,
    /// The node-agent DaemonSet (tiered only).
    pub agent: Option<DaemonSet>,
    /// The remote tier's store, probed from the operator: the address that answered, or why
    /// none did (`None`: no remote tier).
    pub remote: Option<Result<String, String>>,
}

/// Why reconcile did not reach the steady state this time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The spec failed the checks; nothing was changed.
    Invalid(Vec<String>),
    /// Applying failed (a transient API error, a quota, a webhook).
    Apply(String),
}

/// A Deployment's rollout in numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rollout {
    desired: i32,
    ready: i32,
    updated: i32,
    available: i32,
    observed: bool,
    deadline_exceeded: bool,
}

fn rollout(d: &Deployment) -> Rollout {
    let st = d.status.clone().unwrap_or_default();
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let observed = match (st.observed_generation, d.metadata.generation) {
        (Some(seen), Some(gen)) => seen >= gen,
        (_, None) => true,
        (None, Some(_)) => false,
    };
    let deadline_exceeded = st.conditions.unwrap_or_default().iter().any(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    Rollout {
        desired,
        ready: st.ready_replicas.unwrap_or(0),
        updated: st.updated_replicas.unwrap_or(0),
        available: st.available_replicas.unwrap_or(0),
        observed,
        deadline_exceeded,
    }
}

impl Rollout {
    fn done(self) -> bool {
        self.observed && self.updated >= self.desired && self.available >= self.desired
    }
}

/// The status for `kvci` given what exists and what went wrong. Conditions keep their
/// `lastTransitionTime` while their status does not change.
#[must_use]
pub fn compute(
    kvci: &KVCachedInference,
    seen: &Observed,
    problem: Option<&Problem>,
    now: Timestamp,
) -> KVCachedInferenceStatus {
    let old = kvci.status.clone().unwrap_or_default();
    let gen = kvci.metadata.generation;
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = old
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or(Time(now), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: gen,
            last_transition_time: since,
        }
    };

    let engine = seen.engine.as_ref().map(rollout);
    let router = seen.router.as_ref().map(rollout);
    let ready_replicas = engine.map_or(0, |e| e.ready);
    let agent = seen.agent.as_ref().map(|ds| {
        let st = ds.status.clone().unwrap_or_default();
        let observed = st.observed_generation.unwrap_or(0) >= ds.metadata.generation.unwrap_or(0);
        (observed, st.number_ready, st.desired_number_scheduled)
    });

    let mut conditions = Vec::new();
    match problem {
        Some(Problem::Invalid(why)) => conditions.push(cond(
            CONFIG_VALID,
            false,
            "InvalidSpec",
            format!("nothing was changed: {}", why.join("; ")),
        )),
        _ => conditions.push(cond(
            CONFIG_VALID,
            true,
            "Valid",
            "the spec passed the operator's checks".into(),
        )),
    }

    // Ready: what serves, whether or not the latest spec is applied.
    let (ready, reason, message) = match (engine, router) {
        (None, _) | (_, None) => {
            (false, "NotCreated", "the engine or router Deployment does not exist yet".to_owned())
        }
        (Some(e), _) if e.desired == 0 => {
            (false, "ScaledToZero", "spec.engine.replicas is 0".to_owned())
        }
        (Some(e), _) if e.ready < e.desired => (
            false,
            "EnginesNotReady",
            format!("{} of {} engine replicas ready", e.ready, e.desired),
        ),
        (_, Some(r)) if r.ready < 1 => {
            (false, "RouterNotReady", "no router replica is ready".to_owned())
        }
        _ => match agent {
            Some((observed, ready, desired)) if !observed || ready < desired => {
                (false, "NodeAgentNotReady", format!("{ready} of {desired} node-agents ready"))
            }
            _ => (true, "Ready", format!("{ready_replicas} engine replicas behind the router")),
        },
    };
    conditions.push(cond(READY, ready, reason, message));

    let (progressing, reason, message) = match (problem, engine, router) {
        (Some(Problem::Invalid(_)), ..) => {
            (false, "InvalidSpec", "the spec is refused; the last valid one stays".to_owned())
        }
        (_, Some(e), Some(r)) if e.done() && r.done() => {
            (false, "RolloutComplete", "every replica runs the current spec".to_owned())
        }
        (_, Some(e), _) => (
            true,
            "RollingOut",
            format!("engine: {} of {} updated, {} available", e.updated, e.desired, e.available),
        ),
        _ => (true, "Creating", "creating the owned objects".to_owned()),
    };
    conditions.push(cond(PROGRESSING, progressing, reason, message));

    let (degraded, reason, message) = match (problem, engine) {
        (Some(Problem::Apply(e)), _) => (true, "ApplyFailed", e.clone()),
        (_, Some(e)) if e.deadline_exceeded => (
            true,
            "ProgressDeadlineExceeded",
            "the engine Deployment stopped making progress".to_owned(),
        ),
        (_, Some(e)) if e.ready > 0 && e.ready < e.desired => {
            (true, "ReducedCapacity", format!("{} of {} engine replicas ready", e.ready, e.desired))
        }
        _ => (false, "AsExpected", "nothing is failing".to_owned()),
    };
    conditions.push(cond(DEGRADED, degraded, reason, message));

    // The remote tier is an optimisation: unreachable, the node tiers keep serving and the
    // agents retry, so this does not make the resource unready.
    match &seen.remote {
        Some(Ok(addr)) => conditions.push(cond(
            REMOTE_REACHABLE,
            true,
            "Connected",
            format!("{addr} accepts connections from the operator"),
        )),
        Some(Err(why)) => {
            conditions.push(cond(REMOTE_REACHABLE, false, "Unreachable", why.clone()))
        }
        None => {}
    }

    let applied = !matches!(problem, Some(Problem::Invalid(_)));
    KVCachedInferenceStatus {
        observed_generation: gen,
        conditions,
        ready_replicas,
        router_endpoint: Some(objects::router_endpoint(kvci)),
        engine_command: if applied { objects::engine_command(kvci) } else { old.engine_command },
    }
}

/// The condition of `type_`, if set.
#[must_use]
pub fn condition<'a>(st: &'a KVCachedInferenceStatus, type_: &str) -> Option<&'a Condition> {
    st.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_api::crd::KVCachedInferenceSpec;
    use serde_json::json;

    fn kvci(replicas: i32) -> KVCachedInference {
        let spec: KVCachedInferenceSpec = serde_json::from_value(
            json!({"model": {"name": "m"}, "engine": {"replicas": replicas}}),
        )
        .expect("spec");
        let mut k = KVCachedInference::new("coder", spec);
        k.metadata.namespace = Some("agents".into());
        k.metadata.generation = Some(3);
        k
    }

    fn deploy(replicas: i32, ready: i32, updated: i32) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "d", "generation": 2},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
            "status": {"observedGeneration": 2, "readyReplicas": ready,
                       "updatedReplicas": updated, "availableReplicas": ready},
        }))
        .expect("deployment")
    }

    fn get<'a>(st: &'a KVCachedInferenceStatus, t: &str) -> (&'a str, &'a str) {
        let c = condition(st, t).expect(t);
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn ready_follows_the_replicas_the_server_reports() {
        let k = kvci(2);
        let now = Timestamp::now();
        let none = compute(&k, &Observed::default(), None, now);
        assert_eq!(get(&none, READY), ("False", "NotCreated"));
        assert_eq!(get(&none, CONFIG_VALID), ("True", "Valid"));
        assert_eq!(none.router_endpoint.as_deref(), Some("http://coder.agents.svc:8000/v1"));
        assert_eq!(none.engine_command[..2], ["vllm", "serve"]);
        assert_eq!(none.observed_generation, Some(3));

        let mut seen = Observed {
            engine: Some(deploy(2, 0, 2)),
            router: Some(deploy(1, 1, 1)),
            agent: None,
            remote: None,
        };
        let st = compute(&k, &seen, None, now);
        assert_eq!(get(&st, READY), ("False", "EnginesNotReady"));
        assert_eq!(get(&st, PROGRESSING), ("True", "RollingOut"));
        assert_eq!(get(&st, DEGRADED), ("False", "AsExpected"));

        seen.engine = Some(deploy(2, 1, 2));
        let st = compute(&k, &seen, None, now);
        assert_eq!(get(&st, DEGRADED), ("True", "ReducedCapacity"));
        assert_eq!(st.ready_replicas, 1);

        seen.engine = Some(deploy(2, 2, 2));
        let st = compute(&k, &seen, None, now);
        assert_eq!(get(&st, READY), ("True", "Ready"));
        assert_eq!(get(&st, PROGRESSING), ("False", "RolloutComplete"));
        assert_eq!(get(&st, DEGRADED), ("False", "AsExpected"));

        seen.router = Some(deploy(1, 0, 1));
        assert_eq!(get(&compute(&k, &seen, None, now), READY), ("False", "RouterNotReady"));
    }

    #[test]
    fn the_remote_tier_s_reachability_is_a_condition_of_its_own() {
        let k = kvci(1);
        let mut seen = Observed {
            engine: Some(deploy(1, 1, 1)),
            router: Some(deploy(1, 1, 1)),
            ..Observed::default()
        };
        let st = compute(&k, &seen, None, Timestamp::UNIX_EPOCH);
        assert!(condition(&st, REMOTE_REACHABLE).is_none(), "no remote tier, no condition");
        seen.remote = Some(Err("valkey:6379: connection refused".into()));
        let st = compute(&k, &seen, None, Timestamp::UNIX_EPOCH);
        assert_eq!(get(&st, REMOTE_REACHABLE), ("False", "Unreachable"));
        assert_eq!(get(&st, READY).0, "True", "the node tiers still serve");
        seen.remote = Some(Ok("valkey:6379".into()));
        let st = compute(&k, &seen, None, Timestamp::UNIX_EPOCH);
        assert_eq!(get(&st, REMOTE_REACHABLE), ("True", "Connected"));
    }

    #[test]
    fn transition_times_stay_while_the_status_stays() {
        let mut k = kvci(1);
        let seen = Observed {
            engine: Some(deploy(1, 1, 1)),
            router: Some(deploy(1, 1, 1)),
            agent: None,
            remote: None,
        };
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let t1: Timestamp = "2026-01-01T01:00:00Z".parse().expect("time");
        k.status = Some(compute(&k, &seen, None, t0));
        let again = compute(&k, &seen, None, t1);
        assert_eq!(condition(&again, READY).expect("ready").last_transition_time, Time(t0));
        k.status = Some(again);
        let broken = compute(&k, &Observed::default(), None, t1);
        assert_eq!(condition(&broken, READY).expect("ready").last_transition_time, Time(t1));
    }

    #[test]
    fn an_invalid_spec_keeps_the_last_command_and_says_why() {
        let mut k = kvci(1);
        let now = Timestamp::now();
        k.status = Some(KVCachedInferenceStatus {
            engine_command: vec!["vllm".into(), "serve".into(), "--model".into(), "old".into()],
            ..Default::default()
        });
        let why = Problem::Invalid(vec!["spec.cache.dram is not set".into()]);
        let st = compute(&k, &Observed::default(), Some(&why), now);
        let c = condition(&st, CONFIG_VALID).expect("config");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "InvalidSpec"));
        assert!(c.message.contains("spec.cache.dram is not set"), "{}", c.message);
        assert_eq!(get(&st, PROGRESSING), ("False", "InvalidSpec"));
        assert_eq!(st.engine_command[3], "old");

        let failed = Problem::Apply("connection refused".into());
        let st = compute(&k, &Observed::default(), Some(&failed), now);
        assert_eq!(get(&st, DEGRADED), ("True", "ApplyFailed"));
        assert_eq!(get(&st, CONFIG_VALID), ("True", "Valid"));
    }
}
