//! Declarations: what a filter needs from the filters before it, what it provides to the
//! filters after it, whether it may appear once per chain, and whether it confines access.
//!
//! Filters never call each other; they talk through facts in the [`RequestCtx`](crate::RequestCtx).
//! So a chain can be wrong in ways no single filter can see: a filter that reads the verified
//! caller placed before the filter that verifies it, a second identity filter, a tenant check in
//! shadow mode on a route that carries PHI. Each filter states its part in a [`Declaration`]
//! ([`Filter::declaration`]), and [`check`] holds a chain to them.
//! `caregate check` runs it on every route's chain as it runs — the listener's filters first,
//! then the route's — and refuses the config on the first [`Violation`], naming the route and
//! the filters. At run time, a policy filter that lacks what it needs still refuses (fails
//! closed): the check finds the mistake before the first request does.
//!
//! # The model
//!
//! - [`Declaration::needs`]: hard needs. Something that runs before the filter (a filter of the
//!   chain, or the host: the gateway provides [`Capability::Classification`] on a `fhir: true`
//!   route) must provide each of them. No provider at all, or a provider that comes later, is a
//!   violation. `smart_scopes` needs the verified caller and the classification.
//! - [`Declaration::reads`]: ordering needs. The filter works without the capability (and must
//!   then take the strictest reading), but when the chain has a provider, that provider must
//!   come first. `rbac` reads the verified caller: a rule without caller conditions (a health
//!   probe) may run on a route without `jwt_auth`, but an `rbac` placed before `jwt_auth` would
//!   judge every request as anonymous.
//! - [`Declaration::provides`]: what the filter makes available to the filters after it. Some
//!   capabilities are facts with one writer ([`Capability::single_provider`]): a chain with two
//!   providers of one of them fails at run time, so the check refuses it.
//! - [`Declaration::once`]: the filter may appear once per chain (its facts or per-request state
//!   have one writer), whatever the modes.
//! - [`Declaration::confines`]: the filter confines access to what the verified caller may reach.
//!   Where the host demands it ([`ChainRules::enforce_confining`]: on a route that carries PHI),
//!   a confining filter may only run in [`Mode::Enforce`]: in shadow a refusal is only counted,
//!   and in off the filter does not run. Other policy filters keep their shadow mode.
//!
//! A filter in mode off does not run: it neither needs nor provides anything (but it still counts
//! for `once`, and a confining one is still refused where enforcement is demanded). A filter in
//! shadow mode runs, and counts as a provider.
//!
//! # Confinement of patient-context callers
//!
//! Confining a caller with a patient context takes two filters: `smart_scopes` holds the request
//! to the token's SMART scopes ([`Capability::ScopeEnforcement`]) but not to whose data it
//! touches; `patient_compartment` holds it to the caller's own Patient compartment
//! ([`Capability::PatientConfinement`]) but not to the scopes. A chain confines the callers that
//! a [`Capability::Principal`] provider admits when every capability of
//! [`PATIENT_CONTEXT_CONFINEMENT`] is provided after it ([`missing_after`] lists the gaps), which
//! is the question a governance lint asks of a route that admits patient-context tokens.

use crate::{Filter, Mode};
use std::borrow::Cow;

/// Something a filter can need, read or provide. See the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// A verified caller: the [`Principal`](crate::identity::Principal) fact. Provided by
    /// `jwt_auth`.
    Principal,
    /// The gateway's FHIR classification of the request (the `caregate_fhir::FhirRequest`
    /// fact). The gateway provides it before the first filter runs, on `fhir: true` routes only.
    Classification,
    /// The verified tenant: the [`Tenant`](crate::identity::Tenant) fact. Provided by `tenant`.
    Tenant,
    /// The request is held to the caller's SMART scopes. Provided by `smart_scopes`.
    ScopeEnforcement,
    /// Callers with a patient context are kept inside their own Patient compartment. Provided by
    /// `patient_compartment`.
    PatientConfinement,
    /// The emergency-access (break-the-glass) decision: the
    /// [`BreakGlass`](crate::identity::BreakGlass) and
    /// [`BreakGlassAvailable`](crate::identity::BreakGlassAvailable) facts. Provided by
    /// `break_glass`; a filter that honours emergency access reads it.
    BreakGlass,
    /// A capability of users' own filters, named by a stable snake_case name. Two `Custom`
    /// capabilities with the same name are the same capability.
    Custom(&'static str),
}

impl Capability {
    /// A stable snake_case name (`principal`, `classification`, ..., or the custom name).
    pub const fn name(self) -> &'static str {
        match self {
            Capability::Principal => "principal",
            Capability::Classification => "classification",
            Capability::Tenant => "tenant",
            Capability::ScopeEnforcement => "scope_enforcement",
            Capability::PatientConfinement => "patient_confinement",
            Capability::BreakGlass => "break_glass",
            Capability::Custom(name) => name,
        }
    }

    /// How an error message names the capability: `the verified caller`, ...; a custom
    /// capability by its name in backticks.
    pub fn describe(self) -> Cow<'static, str> {
        match self {
            Capability::Principal => Cow::Borrowed("the verified caller"),
            Capability::Classification => Cow::Borrowed("the FHIR classification of the request"),
            Capability::Tenant => Cow::Borrowed("the verified tenant"),
            Capability::ScopeEnforcement => Cow::Borrowed("the enforcement of SMART scopes"),
            Capability::PatientConfinement => {
                Cow::Borrowed("the confinement of patient-context callers to their compartment")
            }
            Capability::BreakGlass => {
                Cow::Borrowed("the emergency-access (break-the-glass) decision")
            }
            Capability::Custom(name) => Cow::Owned(format!("`{name}`")),
        }
    }

    /// The built-in filter kind that provides the capability, for the hint of an error message
    /// (`None` for the classification, which the gateway provides, and for custom ones).
    pub const fn usual_provider(self) -> Option<&'static str> {
        match self {
            Capability::Principal => Some("jwt_auth"),
            Capability::Tenant => Some("tenant"),
            Capability::ScopeEnforcement => Some("smart_scopes"),
            Capability::PatientConfinement => Some("patient_compartment"),
            Capability::BreakGlass => Some("break_glass"),
            Capability::Classification | Capability::Custom(_) => None,
        }
    }

    /// Whether a chain may have one provider of the capability only (the host counts): it is a
    /// fact with one writer, and a second write fails at run time.
    pub const fn single_provider(self) -> bool {
        matches!(
            self,
            Capability::Principal
                | Capability::Tenant
                | Capability::Classification
                | Capability::BreakGlass
        )
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a filter needs, reads and provides, and whether it may appear once per chain and
/// confines access. See the [module documentation](self) for what each part means and the rules
/// [`check`] applies.
///
/// The default (also [`Declaration::NONE`]) declares nothing, so a filter that does not override
/// [`Filter::declaration`] is never refused by the check. Build one
/// with the `const` builder methods:
///
/// ```
/// use caregate_filter_api::{Capability, Declaration};
///
/// const MINE: Declaration = Declaration::new()
///     .needs(&[Capability::Principal])
///     .provides(&[Capability::Custom("consent_checked")])
///     .once();
/// assert!(MINE.once && !MINE.confines);
/// ```
///
/// A declaration that depends on the filter's config picks one of several constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Declaration {
    /// Capabilities that must be provided before the filter runs (by an earlier filter of the
    /// chain, or by the host).
    pub needs: &'static [Capability],
    /// Capabilities the filter uses when the chain has them: a provider in the chain must come
    /// before the filter, but the chain may have none.
    pub reads: &'static [Capability],
    /// Capabilities the filter provides to the filters after it.
    pub provides: &'static [Capability],
    /// The filter may appear once per chain (listener and route filters together).
    pub once: bool,
    /// The filter confines access to what the verified caller may reach: where the host demands
    /// it (a route that carries PHI), it may only run in enforce mode.
    pub confines: bool,
}

impl Declaration {
    /// Declares nothing: no needs, provides nothing, not once, not confining.
    pub const NONE: Declaration = Declaration {
        needs: &[],
        reads: &[],
        provides: &[],
        once: false,
        confines: false,
    };

    /// An empty declaration, to build on.
    pub const fn new() -> Self {
        Self::NONE
    }

    /// With these hard needs (replacing any given before).
    pub const fn needs(self, needs: &'static [Capability]) -> Self {
        Declaration { needs, ..self }
    }

    /// With these ordering needs (replacing any given before).
    pub const fn reads(self, reads: &'static [Capability]) -> Self {
        Declaration { reads, ..self }
    }

    /// Providing these capabilities (replacing any given before).
    pub const fn provides(self, provides: &'static [Capability]) -> Self {
        Declaration { provides, ..self }
    }

    /// May appear once per chain.
    pub const fn once(self) -> Self {
        Declaration { once: true, ..self }
    }

    /// Confines access (enforce mode only where the host demands it).
    pub const fn confining(self) -> Self {
        Declaration {
            confines: true,
            ..self
        }
    }
}

/// One filter of a chain as [`check`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// The filter's kind.
    pub kind: &'static str,
    /// The filter's mode.
    pub mode: Mode,
    /// The filter's declaration.
    pub declaration: Declaration,
}

impl Link {
    /// The link of a built filter.
    pub fn of(filter: &dyn Filter) -> Link {
        Link {
            kind: filter.kind(),
            mode: filter.mode(),
            declaration: filter.declaration(),
        }
    }

    /// Whether the filter runs (any mode but off).
    pub fn runs(&self) -> bool {
        self.mode != Mode::Off
    }

    fn provides(&self, capability: Capability) -> bool {
        self.runs() && self.declaration.provides.contains(&capability)
    }
}

/// What the host (the gateway) guarantees and demands around one chain.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChainRules<'a> {
    /// Capabilities provided before the first filter runs: the gateway provides
    /// [`Capability::Classification`] on a `fhir: true` route.
    pub provided: &'a [Capability],
    /// Confining filters must run in enforce mode: the gateway demands it on a route that
    /// carries PHI (`phi: true`).
    pub enforce_confining: bool,
}

/// A chain that breaks a declaration. Filters are named by their index in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// The filter at `at` needs `capability`, and nothing in the chain (nor the host) provides
    /// it. `off` is a filter that would provide it but is in mode off, if there is one.
    Missing {
        /// The index of the filter that needs the capability.
        at: usize,
        /// The capability nothing provides.
        capability: Capability,
        /// The index of a filter in mode off that would provide it, if there is one.
        off: Option<usize>,
    },
    /// The filter at `at` needs (`hard`) or reads `capability`, and the first filter that
    /// provides it, `provider`, runs after it.
    ProvidedLater {
        /// The index of the filter that needs or reads the capability.
        at: usize,
        /// The index of the first running filter that provides it (after `at`).
        provider: usize,
        /// The capability provided too late.
        capability: Capability,
        /// `true` for a hard need ([`Declaration::needs`]), `false` for an ordering need
        /// ([`Declaration::reads`]).
        hard: bool,
    },
    /// The filter at `again` may appear once per chain, and a filter of the same kind is at
    /// `first` already.
    Repeated {
        /// The index of the first filter of that kind.
        first: usize,
        /// The index of the repetition.
        again: usize,
    },
    /// The filter at `again` provides `capability`, which has one provider per chain, and the
    /// filter at `first` (or, for `None`, the host) provides it already.
    ProvidedTwice {
        /// The index of the filter that provides it first, or `None` when the host does.
        first: Option<usize>,
        /// The index of the second provider.
        again: usize,
        /// The single-provider capability ([`Capability::single_provider`]).
        capability: Capability,
    },
    /// The confining filter at `at` is in `mode` (shadow or off) where the host demands enforce.
    NotEnforced {
        /// The index of the confining filter.
        at: usize,
        /// Its mode ([`Mode::Shadow`] or [`Mode::Off`]).
        mode: Mode,
    },
}

/// Every way `chain` (in the order it runs) breaks its filters' declarations under `rules`, in
/// chain order (for each filter: its mode, `once`, its provides, then its needs and reads).
/// Empty when the chain is sound.
pub fn check(chain: &[Link], rules: &ChainRules<'_>) -> Vec<Violation> {
    let mut out = Vec::new();
    for (n, link) in chain.iter().enumerate() {
        let d = &link.declaration;
        if rules.enforce_confining && d.confines && link.mode != Mode::Enforce {
            out.push(Violation::NotEnforced {
                at: n,
                mode: link.mode,
            });
        }
        let repeated = if d.once {
            chain[..n].iter().position(|o| o.kind == link.kind)
        } else {
            None
        };
        if let Some(first) = repeated {
            out.push(Violation::Repeated { first, again: n });
        }
        if !link.runs() {
            continue;
        }
        for &capability in d.provides {
            if !capability.single_provider() {
                continue;
            }
            let first = if rules.provided.contains(&capability) {
                Some(None)
            } else {
                chain[..n]
                    .iter()
                    .position(|o| o.provides(capability))
                    // A repeated kind is reported as such.
                    .filter(|&p| repeated.is_none() || chain[p].kind != link.kind)
                    .map(Some)
            };
            if let Some(first) = first {
                out.push(Violation::ProvidedTwice {
                    first,
                    again: n,
                    capability,
                });
            }
        }
        let needs = d.needs.iter().map(|&c| (c, true));
        let reads = d.reads.iter().map(|&c| (c, false));
        for (capability, hard) in needs.chain(reads) {
            if rules.provided.contains(&capability)
                || chain[..n].iter().any(|o| o.provides(capability))
            {
                continue;
            }
            let later = chain[n + 1..]
                .iter()
                .position(|o| o.provides(capability))
                .map(|p| p + n + 1);
            match later {
                Some(provider) => out.push(Violation::ProvidedLater {
                    at: n,
                    provider,
                    capability,
                    hard,
                }),
                None if hard => {
                    let off = chain.iter().enumerate().position(|(k, o)| {
                        k != n && !o.runs() && o.declaration.provides.contains(&capability)
                    });
                    out.push(Violation::Missing {
                        at: n,
                        capability,
                        off,
                    });
                }
                None => {}
            }
        }
    }
    out
}

/// What a chain must provide after the filter that admits a caller with a patient context (its
/// [`Capability::Principal`] provider) to confine that caller to the patient: the scopes and
/// the compartment. See the [module documentation](self#confinement-of-patient-context-callers).
pub const PATIENT_CONTEXT_CONFINEMENT: &[Capability] =
    &[Capability::ScopeEnforcement, Capability::PatientConfinement];

/// The capabilities of `wanted` that no running filter after the one at `at` provides, in the
/// order of `wanted`. With [`PATIENT_CONTEXT_CONFINEMENT`] and the index of a `jwt_auth` that
/// admits patient-context tokens, an empty answer means the route confines those callers.
pub fn missing_after(chain: &[Link], at: usize, wanted: &[Capability]) -> Vec<Capability> {
    let after = chain.get(at + 1..).unwrap_or(&[]);
    wanted
        .iter()
        .copied()
        .filter(|&c| !after.iter().any(|o| o.provides(c)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Capability::*;

    fn link(kind: &'static str, mode: Mode, declaration: Declaration) -> Link {
        Link {
            kind,
            mode,
            declaration,
        }
    }

    const AUTH: Declaration = Declaration::new().provides(&[Principal]).once().confining();
    const SCOPES: Declaration = Declaration::new()
        .needs(&[Principal, Classification])
        .provides(&[ScopeEnforcement])
        .confining();
    const RBAC: Declaration = Declaration::new().reads(&[Principal]);

    fn auth(mode: Mode) -> Link {
        link("jwt_auth", mode, AUTH)
    }
    fn scopes(mode: Mode) -> Link {
        link("smart_scopes", mode, SCOPES)
    }

    const FHIR: ChainRules<'static> = ChainRules {
        provided: &[Classification],
        enforce_confining: false,
    };

    #[test]
    fn the_default_declares_nothing() {
        assert_eq!(Declaration::default(), Declaration::NONE);
        assert_eq!(Declaration::new(), Declaration::NONE);
        let plain = link("headers", Mode::Enforce, Declaration::NONE);
        let rules = ChainRules {
            provided: &[],
            enforce_confining: true,
        };
        assert!(check(&[plain, plain, plain], &rules).is_empty());
    }

    #[test]
    fn a_sound_chain_passes() {
        let chain = [
            auth(Mode::Enforce),
            link("rbac", Mode::Enforce, RBAC),
            scopes(Mode::Enforce),
        ];
        assert!(check(&chain, &FHIR).is_empty());
        // A reader without any provider is fine.
        assert!(check(&[link("rbac", Mode::Shadow, RBAC)], &FHIR).is_empty());
    }

    #[test]
    fn a_need_without_provider() {
        assert_eq!(
            check(&[scopes(Mode::Enforce)], &FHIR),
            vec![Violation::Missing {
                at: 0,
                capability: Principal,
                off: None
            }]
        );
        // The classification comes from the host only.
        assert_eq!(
            check(
                &[auth(Mode::Enforce), scopes(Mode::Enforce)],
                &ChainRules::default()
            ),
            vec![Violation::Missing {
                at: 1,
                capability: Classification,
                off: None
            }]
        );
        // A provider in mode off provides nothing; the message can name it.
        assert_eq!(
            check(&[auth(Mode::Off), scopes(Mode::Enforce)], &FHIR),
            vec![Violation::Missing {
                at: 1,
                capability: Principal,
                off: Some(0)
            }]
        );
        // A needer in mode off needs nothing.
        assert!(check(&[scopes(Mode::Off)], &FHIR).is_empty());
    }

    #[test]
    fn a_provider_after_its_needer_or_reader() {
        assert_eq!(
            check(&[scopes(Mode::Enforce), auth(Mode::Shadow)], &FHIR),
            vec![Violation::ProvidedLater {
                at: 0,
                provider: 1,
                capability: Principal,
                hard: true
            }]
        );
        assert_eq!(
            check(
                &[link("rbac", Mode::Enforce, RBAC), auth(Mode::Enforce)],
                &FHIR
            ),
            vec![Violation::ProvidedLater {
                at: 0,
                provider: 1,
                capability: Principal,
                hard: false
            }]
        );
        // A later provider in mode off does not count: the reader simply has none.
        assert!(check(&[link("rbac", Mode::Enforce, RBAC), auth(Mode::Off)], &FHIR).is_empty());
    }

    #[test]
    fn once_and_single_providers() {
        assert_eq!(
            check(&[auth(Mode::Enforce), auth(Mode::Off)], &FHIR),
            vec![Violation::Repeated { first: 0, again: 1 }]
        );
        // Reported once, as a repetition, not also as a second provider.
        assert_eq!(
            check(&[auth(Mode::Enforce), auth(Mode::Enforce)], &FHIR),
            vec![Violation::Repeated { first: 0, again: 1 }]
        );
        let api_key = link(
            "api_key",
            Mode::Enforce,
            Declaration::new().provides(&[Principal]),
        );
        assert_eq!(
            check(&[auth(Mode::Enforce), api_key], &FHIR),
            vec![Violation::ProvidedTwice {
                first: Some(0),
                again: 1,
                capability: Principal
            }]
        );
        let classifier = link(
            "classifier",
            Mode::Enforce,
            Declaration::new().provides(&[Classification]),
        );
        assert_eq!(
            check(&[classifier], &FHIR),
            vec![Violation::ProvidedTwice {
                first: None,
                again: 0,
                capability: Classification
            }]
        );
        // Off, it provides nothing; on a route without the host's classification, it is the one.
        assert!(check(
            &[link("classifier", Mode::Off, classifier.declaration)],
            &FHIR
        )
        .is_empty());
        assert!(check(
            &[classifier, auth(Mode::Enforce), scopes(Mode::Enforce)],
            &ChainRules::default()
        )
        .is_empty());
        // Capabilities other than facts with one writer may have several providers.
        let two = [scopes(Mode::Enforce), scopes(Mode::Enforce)];
        let chain = [auth(Mode::Enforce), two[0], two[1]];
        assert!(check(&chain, &FHIR).is_empty());
    }

    #[test]
    fn confining_filters_enforce_where_demanded() {
        let phi = ChainRules {
            provided: &[Classification],
            enforce_confining: true,
        };
        assert_eq!(
            check(&[auth(Mode::Enforce), scopes(Mode::Shadow)], &phi),
            vec![Violation::NotEnforced {
                at: 1,
                mode: Mode::Shadow
            }]
        );
        // Off is refused too, and does not run (so it provides nothing to the scopes).
        assert_eq!(
            check(&[auth(Mode::Off), scopes(Mode::Enforce)], &phi),
            vec![
                Violation::NotEnforced {
                    at: 0,
                    mode: Mode::Off
                },
                Violation::Missing {
                    at: 1,
                    capability: Principal,
                    off: Some(0)
                }
            ]
        );
        // Not demanded, or not confining: allowed.
        assert!(check(&[auth(Mode::Shadow), scopes(Mode::Off)], &FHIR).is_empty());
        assert!(check(
            &[auth(Mode::Enforce), link("rbac", Mode::Shadow, RBAC)],
            &phi
        )
        .is_empty());
    }

    #[test]
    fn patient_context_confinement_needs_both_filters_after_the_caller() {
        let compartment = link(
            "patient_compartment",
            Mode::Enforce,
            Declaration::new()
                .needs(&[Principal, Classification])
                .provides(&[PatientConfinement])
                .once()
                .confining(),
        );
        let full = [auth(Mode::Enforce), scopes(Mode::Shadow), compartment];
        assert!(missing_after(&full, 0, PATIENT_CONTEXT_CONFINEMENT).is_empty());
        assert_eq!(
            missing_after(
                &[auth(Mode::Enforce), scopes(Mode::Off), compartment],
                0,
                PATIENT_CONTEXT_CONFINEMENT
            ),
            vec![ScopeEnforcement]
        );
        assert_eq!(
            missing_after(
                &[scopes(Mode::Enforce), auth(Mode::Enforce), compartment],
                1,
                PATIENT_CONTEXT_CONFINEMENT
            ),
            vec![ScopeEnforcement]
        );
        assert_eq!(
            missing_after(&full, 9, PATIENT_CONTEXT_CONFINEMENT),
            PATIENT_CONTEXT_CONFINEMENT.to_vec()
        );
    }

    #[test]
    fn names_and_descriptions() {
        assert_eq!(Principal.name(), "principal");
        assert_eq!(Custom("consent").to_string(), "consent");
        assert_eq!(Custom("consent").describe(), "`consent`");
        assert_eq!(Principal.describe(), "the verified caller");
        assert_eq!(Principal.usual_provider(), Some("jwt_auth"));
        assert_eq!(Classification.usual_provider(), None);
        assert!(Tenant.single_provider() && !PatientConfinement.single_provider());
        assert_eq!(Custom("a"), Custom("a"));
        assert_ne!(Custom("a"), Custom("b"));
    }
}
