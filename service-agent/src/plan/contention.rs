//! Two Services claiming one frontend: the first claimant in the claim order
//! keeps it, the other is refused as a whole and names the winner. The full
//! compile and the incremental planner settle claims through [`Claims`], so
//! they word and decide a clash alike.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;

use super::{
    error::{FieldError, Refusal},
    service::{Compiled, Ctx},
    types::{FrontendKey, FrontendPlan, HealthCheck, Problem, Skipped},
};
use crate::model::object_ref;

/// Without a creationTimestamp, the timestamp, `namespace/name`.
pub(super) type ClaimOrder = (bool, Option<k8s_openapi::jiff::Timestamp>, String);

/// Who claims a contested frontend first, after the Services already
/// serving one: the older by creationTimestamp (those without one last),
/// then by `namespace/name`.
pub(super) fn claim_order(svc: &Service) -> ClaimOrder {
    let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (created.is_none(), created, object_ref(&svc.metadata))
}

/// One Service object compiled on its own, before any claim is settled.
pub(super) struct CompiledService {
    pub order: ClaimOrder,
    /// `namespace/name`, and where the object was read.
    pub name: String,
    pub origin: String,
    pub result: Result<Compiled, Refusal>,
    /// Problems with parts of it that do not refuse it.
    pub problems: Vec<Problem>,
}

impl CompiledService {
    pub fn new(ctx: Ctx<'_>, result: Result<Compiled, Refusal>) -> Self {
        Self {
            order: claim_order(&ctx.svc.object),
            origin: ctx.svc.origin.clone(),
            name: ctx.name,
            result,
            problems: ctx.problems,
        }
    }
}

/// What one Service object comes to once its claims are settled.
pub(super) struct Settled<'a> {
    pub skipped: Option<Skipped>,
    /// The frontends it won (all it asked for, or none).
    pub won: &'a [(FrontendKey, FrontendPlan)],
    pub health: Option<HealthCheck>,
    pub problems: Vec<Problem>,
    /// Refused as a whole: its previous frontends stay programmed.
    pub refused: bool,
}

/// Frontend → the Service that claimed it first, over Services offered in
/// claim order.
#[derive(Default)]
pub(super) struct Claims<'a> {
    owner: BTreeMap<FrontendKey, &'a str>,
}

impl<'a> Claims<'a> {
    /// Offers one compiled Service object its frontends: it wins all of
    /// them unless another Service claimed one first. Objects of one name
    /// (a manifest repeating a Service) do not contend with each other.
    pub fn settle(&mut self, c: &'a CompiledService) -> Settled<'a> {
        let name = c.name.as_str();
        let mut out = Settled {
            skipped: None,
            won: &[],
            health: None,
            problems: c.problems.clone(),
            refused: false,
        };
        match &c.result {
            Ok(Compiled::Skipped(reason)) => {
                out.skipped = Some(Skipped {
                    service: name.to_string(),
                    reason: reason.to_string(),
                })
            }
            Ok(Compiled::Frontends(fes, health)) => {
                let clash = fes.iter().find_map(|(key, _)| {
                    let other = self.owner.get(key).filter(|o| **o != name)?;
                    Some((*key, other.to_string()))
                });
                match clash {
                    Some((key, other)) => {
                        let refusal = Refusal {
                            object: format!("Service {name}"),
                            field: "spec".into(),
                            error: FieldError::FrontendTaken { key, other },
                        };
                        out.problems.push(refusal.problem(&c.origin));
                        out.refused = true;
                    }
                    None => {
                        for (key, _) in fes {
                            self.owner.insert(*key, name);
                        }
                        out.won = fes;
                        out.health = health.clone();
                    }
                }
            }
            Err(refusal) => {
                out.problems.push(refusal.problem(&c.origin));
                out.refused = true;
            }
        }
        out
    }
}
