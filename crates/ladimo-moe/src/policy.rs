//! Routing policies: for each token, which experts run.

use serde::{Deserialize, Serialize};

use crate::MoeError;

/// Decides, per token, which experts run. `probs` are the token's router probabilities (one per
/// expert, summing to 1); `order` is the experts sorted by probability, highest first (ties: lower
/// index first). The policy writes the chosen experts into `out`, most probable first.
pub trait RoutingPolicy {
    fn select(&self, probs: &[f32], order: &[usize], out: &mut Vec<usize>);
    /// Refuse parameters that cannot work with `num_experts` experts.
    fn validate(&self, num_experts: usize) -> Result<(), MoeError>;
}

/// The policies ladimo knows, as saved in configs and checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Policy {
    /// The `k` most probable experts.
    TopK { k: usize },
    /// Dynamic top-p: keep experts (most probable first) while the cumulative probability of
    /// those before it is below `p`; the top-1 always runs; the count is clamped to `[min_k, max_k]`.
    TopP { p: f32, min_k: usize, max_k: usize },
    /// `k_low` experts when the top-1 probability is at least `tau`, else `k_high`.
    Confidence { tau: f32, k_low: usize, k_high: usize },
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::TopK { k } => write!(f, "top-{k}"),
            Policy::TopP { p, min_k, max_k } => write!(f, "top-p {p} [{min_k}, {max_k}]"),
            Policy::Confidence { tau, k_low, k_high } => write!(f, "confidence tau {tau}: {k_low} / {k_high}"),
        }
    }
}

impl RoutingPolicy for Policy {
    fn select(&self, probs: &[f32], order: &[usize], out: &mut Vec<usize>) {
        out.clear();
        let k = match *self {
            Policy::TopK { k } => k,
            Policy::TopP { p, min_k, max_k } => {
                let mut cum = 0f32;
                let mut k = 0;
                for &e in order {
                    if k > 0 && cum >= p {
                        break;
                    }
                    cum += probs[e];
                    k += 1;
                }
                k.clamp(min_k, max_k)
            }
            Policy::Confidence { tau, k_low, k_high } => {
                if probs[order[0]] >= tau {
                    k_low
                } else {
                    k_high
                }
            }
        };
        out.extend_from_slice(&order[..k.min(order.len())]);
    }

    fn validate(&self, n: usize) -> Result<(), MoeError> {
        let bad = |msg: String| {
            Err(MoeError::Policy {
                policy: self.to_string(),
                msg,
            })
        };
        let in_range = |k: usize, name: &str| -> Result<(), MoeError> {
            if k == 0 || k > n {
                return bad(format!(
                    "{name} = {k} must be between 1 and the number of experts ({n})"
                ));
            }
            Ok(())
        };
        match *self {
            Policy::TopK { k } => in_range(k, "k"),
            Policy::TopP { p, min_k, max_k } => {
                if !(0.0..=1.0).contains(&p) {
                    return bad(format!("p = {p} must be in [0, 1]"));
                }
                in_range(min_k, "min_k")?;
                in_range(max_k, "max_k")?;
                if min_k > max_k {
                    return bad(format!("min_k {min_k} > max_k {max_k}"));
                }
                Ok(())
            }
            Policy::Confidence { tau, k_low, k_high } => {
                if !(0.0..=1.0).contains(&tau) {
                    return bad(format!("tau = {tau} must be in [0, 1]"));
                }
                in_range(k_low, "k_low")?;
                in_range(k_high, "k_high")
            }
        }
    }
}

/// Experts sorted by probability, highest first; ties keep the lower index first.
pub fn order_by_prob(probs: &[f32], order: &mut Vec<usize>) {
    order.clear();
    order.extend(0..probs.len());
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &Policy, probs: &[f32]) -> Vec<usize> {
        let mut order = Vec::new();
        order_by_prob(probs, &mut order);
        let mut out = Vec::new();
        p.select(probs, &order, &mut out);
        out
    }

    #[test]
    fn top_k_picks_the_largest_and_breaks_ties_by_index() {
        let probs = [0.1, 0.3, 0.3, 0.2, 0.1];
        assert_eq!(run(&Policy::TopK { k: 2 }, &probs), [1, 2]);
        assert_eq!(run(&Policy::TopK { k: 3 }, &probs), [1, 2, 3]);
        assert_eq!(run(&Policy::TopK { k: 5 }, &probs), [1, 2, 3, 0, 4]);
        // ties at the cut: the lower index wins
        assert_eq!(run(&Policy::TopK { k: 1 }, &[0.25, 0.25, 0.25, 0.25]), [0]);
    }

    #[test]
    fn top_p_keeps_experts_while_the_mass_before_them_is_below_p() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        let tp = |p| Policy::TopP { p, min_k: 1, max_k: 4 };
        // p = 0: only the top-1 (which always runs)
        assert_eq!(run(&tp(0.0), &probs), [0]);
        // 0.5 before the 2nd: 0.5 < 0.6 keeps it; 0.8 before the 3rd stops
        assert_eq!(run(&tp(0.6), &probs), [0, 1]);
        assert_eq!(run(&tp(0.5), &probs), [0]);
        assert_eq!(run(&tp(0.81), &probs), [0, 1, 2]);
        // p = 1: every expert with mass before it below 1, i.e. all of them
        assert_eq!(run(&tp(1.0), &probs), [0, 1, 2, 3]);
        // bounds
        assert_eq!(
            run(
                &Policy::TopP {
                    p: 0.0,
                    min_k: 2,
                    max_k: 4
                },
                &probs
            ),
            [0, 1]
        );
        assert_eq!(
            run(
                &Policy::TopP {
                    p: 1.0,
                    min_k: 1,
                    max_k: 2
                },
                &probs
            ),
            [0, 1]
        );
    }

    #[test]
    fn confidence_switches_on_the_top_1_probability() {
        let c = Policy::Confidence {
            tau: 0.6,
            k_low: 1,
            k_high: 3,
        };
        assert_eq!(run(&c, &[0.7, 0.2, 0.1]), [0]);
        assert_eq!(run(&c, &[0.6, 0.3, 0.1]), [0], "tau is inclusive");
        assert_eq!(run(&c, &[0.2, 0.5, 0.3]), [1, 2, 0]);
    }

    #[test]
    fn impossible_policies_are_refused_with_a_clear_error() {
        let e = Policy::TopK { k: 9 }.validate(8).unwrap_err();
        assert!(
            e.to_string()
                .contains("k = 9 must be between 1 and the number of experts (8)"),
            "{e}"
        );
        assert!(Policy::TopK { k: 0 }.validate(8).is_err());
        assert!(Policy::TopK { k: 8 }.validate(8).is_ok());
        assert!(
            Policy::TopP {
                p: 1.5,
                min_k: 1,
                max_k: 2
            }
            .validate(8)
            .is_err()
        );
        assert!(
            Policy::TopP {
                p: 0.5,
                min_k: 3,
                max_k: 2
            }
            .validate(8)
            .is_err()
        );
        assert!(
            Policy::TopP {
                p: 0.5,
                min_k: 1,
                max_k: 9
            }
            .validate(8)
            .is_err()
        );
        assert!(
            Policy::Confidence {
                tau: 0.5,
                k_low: 1,
                k_high: 9
            }
            .validate(8)
            .is_err()
        );
        assert!(
            Policy::Confidence {
                tau: -0.1,
                k_low: 1,
                k_high: 2
            }
            .validate(8)
            .is_err()
        );
    }

    #[test]
    fn policies_round_trip_through_toml_style_serde() {
        let p = Policy::TopP {
            p: 0.7,
            min_k: 1,
            max_k: 4,
        };
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(s, r#"{"type":"TopP","p":0.7,"min_k":1,"max_k":4}"#);
        assert_eq!(serde_json::from_str::<Policy>(&s).unwrap(), p);
        assert!(serde_json::from_str::<Policy>(r#"{"type":"TopK","k":2,"x":1}"#).is_err());
    }
}
