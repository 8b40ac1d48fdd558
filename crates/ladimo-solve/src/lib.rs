//! Exact multiple-choice knapsack: pick exactly one [`Choice`] per group so that the summed cost is
//! least while the summed weight stays within a budget ([`solve`]), or list every optimal trade-off
//! ([`frontier`]). LaDiMo uses it to pick one routing policy per MoE layer under a budget of
//! activated parameters (or latency) per token; the crate itself knows nothing of policies.
//!
//! Why exact: a greedy pick (best cost per unit of weight, layer by layer) can miss the optimum by an
//! arbitrary margin when the per-layer trade-offs are not convex, and the problem is small enough
//! (tens of layers, tens of policies) to solve exactly. The solver runs dynamic programming over
//! Pareto sets: the nondominated `(weight, cost)` partial sums of the first groups are combined with
//! every choice of the next group and the dominated sums are dropped. Weights stay real numbers (no
//! discretisation), so the answer is the true optimum of the given floats.
//!
//! # Floating point
//!
//! Sums are always formed group by group, in group order, so the reported `cost`/`weight` are exactly
//! what summing the picked choices in that order gives. Pruning is exact in floating point too:
//! rounded addition is monotone, so a partial sum that dominates another still does after the same
//! choices are added to both. The only tolerance is on the budget: a solution whose weight is at most
//! `budget + BUDGET_REL_TOL * |budget|` is accepted, so that a budget computed by summing the same
//! weights in another order is not missed by one rounding (see [`BUDGET_REL_TOL`]).
//!
//! # Size
//!
//! After `g` groups the set holds at most `min(k_1 * ... * k_g, distinct weights)` points; in the
//! worst case (every combination nondominated) it grows geometrically. Each group costs
//! `O(k (|S| + |S'|))` time (linear merges) and keeps 8 bytes of back-pointer per point. Rather than
//! approximate silently, a set larger than [`Options::max_points`] (default 2,000,000) is an error,
//! [`SolveError::TooManyPoints`]. [`solve`] also drops partial sums that can no longer fit the
//! budget, which keeps its sets smaller than [`frontier`]'s.

/// Relative slack on the budget for floating-point summation order: a solution is feasible when its
/// weight is at most `budget + BUDGET_REL_TOL * |budget|`.
pub const BUDGET_REL_TOL: f64 = 1e-12;

/// Default cap on the number of points in one Pareto set ([`Options::max_points`]).
pub const DEFAULT_MAX_POINTS: usize = 2_000_000;

/// One option of a group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// What the choice costs (quality loss; lower is better). Any finite value, negative included.
    pub cost: f64,
    /// How much of the budget it uses (activated parameters, latency). Finite and `>= 0`.
    pub weight: f64,
}

/// The optimum under a budget: one choice index per group.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// `picks[g]` indexes `groups[g]`.
    pub picks: Vec<usize>,
    /// Summed cost of the picks (summed in group order).
    pub cost: f64,
    /// Summed weight of the picks (summed in group order).
    pub weight: f64,
}

/// One point of the Pareto frontier: no selection has both lower-or-equal weight and lower cost.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontierPoint {
    pub weight: f64,
    pub cost: f64,
    /// `picks[g]` indexes `groups[g]`.
    pub picks: Vec<usize>,
}

/// Solver limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Largest Pareto set allowed after any group; beyond it the solver returns
    /// [`SolveError::TooManyPoints`] instead of approximating.
    pub max_points: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_points: DEFAULT_MAX_POINTS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SolveError {
    #[error("budget {budget} is below the least possible weight {minimum} (the lightest choice of every group)")]
    BudgetTooSmall { budget: f64, minimum: f64 },
    #[error("budget {budget} is not a finite number")]
    BudgetNotFinite { budget: f64 },
    #[error("group {group} has no choices")]
    EmptyGroup { group: usize },
    #[error("group {group}, choice {choice}: cost and weight must be finite numbers")]
    NotFinite { group: usize, choice: usize },
    #[error("group {group}, choice {choice}: weight {weight} is negative")]
    NegativeWeight { group: usize, choice: usize, weight: f64 },
    #[error("group {group}, choice {choice}: more choices than the solver indexes (u32)")]
    TooManyChoices { group: usize, choice: usize },
    #[error(
        "a Pareto set while adding group {group} reached {points} points, over the cap of {max_points}; \
         raise Options::max_points (memory: ~8 bytes per point per group) or coarsen the inputs"
    )]
    TooManyPoints {
        group: usize,
        points: usize,
        max_points: usize,
    },
}

/// Least summed cost with summed weight within `budget` (see [`BUDGET_REL_TOL`]), exactly one choice
/// per group. Of equal-cost optima the lightest is returned. No groups: the empty solution.
pub fn solve(groups: &[Vec<Choice>], budget: f64) -> Result<Solution, SolveError> {
    solve_with(groups, budget, &Options::default())
}

/// [`solve`] with explicit [`Options`].
pub fn solve_with(groups: &[Vec<Choice>], budget: f64, options: &Options) -> Result<Solution, SolveError> {
    validate(groups)?;
    if !budget.is_finite() {
        return Err(SolveError::BudgetNotFinite { budget });
    }
    let limit = budget + BUDGET_REL_TOL * budget.abs();
    let minimum = sequential_sum(0.0, groups.iter().map(|g| min_weight(g)));
    if minimum > limit {
        return Err(SolveError::BudgetTooSmall { budget, minimum });
    }
    let dp = run(groups, Some(limit), options)?;
    // The final set is sorted by weight with cost strictly decreasing: the last feasible point is
    // the cheapest, and the lightest of that cost.
    let best = dp
        .points
        .iter()
        .rposition(|p| p.weight <= limit)
        .ok_or(SolveError::BudgetTooSmall { budget, minimum })?;
    let p = dp.points[best];
    Ok(Solution {
        picks: dp.picks(best),
        cost: p.cost,
        weight: p.weight,
    })
}

/// The whole Pareto frontier of `(summed weight, summed cost)`, sorted by weight ascending with cost
/// strictly decreasing. Each point carries its picks. No groups: the single point `(0, 0)`.
pub fn frontier(groups: &[Vec<Choice>]) -> Result<Vec<FrontierPoint>, SolveError> {
    frontier_with(groups, &Options::default())
}

/// [`frontier`] with explicit [`Options`].
pub fn frontier_with(groups: &[Vec<Choice>], options: &Options) -> Result<Vec<FrontierPoint>, SolveError> {
    validate(groups)?;
    let dp = run(groups, None, options)?;
    Ok((0..dp.points.len())
        .map(|i| FrontierPoint {
            weight: dp.points[i].weight,
            cost: dp.points[i].cost,
            picks: dp.picks(i),
        })
        .collect())
}

fn validate(groups: &[Vec<Choice>]) -> Result<(), SolveError> {
    for (g, choices) in groups.iter().enumerate() {
        if choices.is_empty() {
            return Err(SolveError::EmptyGroup { group: g });
        }
        if choices.len() > u32::MAX as usize {
            return Err(SolveError::TooManyChoices {
                group: g,
                choice: u32::MAX as usize,
            });
        }
        for (c, choice) in choices.iter().enumerate() {
            if !choice.cost.is_finite() || !choice.weight.is_finite() {
                return Err(SolveError::NotFinite { group: g, choice: c });
            }
            if choice.weight < 0.0 {
                return Err(SolveError::NegativeWeight {
                    group: g,
                    choice: c,
                    weight: choice.weight,
                });
            }
        }
    }
    Ok(())
}

fn min_weight(choices: &[Choice]) -> f64 {
    choices.iter().map(|c| c.weight).fold(f64::INFINITY, f64::min)
}

/// `start + xs[0] + xs[1] + ...`, rounded step by step in that order.
fn sequential_sum(start: f64, xs: impl IntoIterator<Item = f64>) -> f64 {
    xs.into_iter().fold(start, |acc, x| acc + x)
}

#[derive(Debug, Clone, Copy)]
struct Point {
    weight: f64,
    cost: f64,
}

/// How a point of group `g`'s set was made: point `parent` of group `g - 1`'s set plus `choice`.
#[derive(Debug, Clone, Copy)]
struct Back {
    parent: u32,
    choice: u32,
}

struct Dp {
    /// The final Pareto set, weight ascending, cost strictly decreasing.
    points: Vec<Point>,
    /// `backs[g][i]`: origin of point `i` of the set after group `g`.
    backs: Vec<Vec<Back>>,
}

impl Dp {
    fn picks(&self, mut index: usize) -> Vec<usize> {
        let mut picks = vec![0; self.backs.len()];
        for (g, backs) in self.backs.iter().enumerate().rev() {
            let b = backs[index];
            picks[g] = b.choice as usize;
            index = b.parent as usize;
        }
        picks
    }
}

/// Indices of the choices no other choice of the group dominates, lightest first; of exact
/// duplicates the first.
fn nondominated(choices: &[Choice]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..choices.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (choices[a], choices[b]);
        a.weight.total_cmp(&b.weight).then(a.cost.total_cmp(&b.cost))
    });
    let mut best = f64::INFINITY;
    order.retain(|&i| {
        let keep = choices[i].cost < best;
        best = best.min(choices[i].cost);
        keep
    });
    order
}

/// Appends `q` to a weight-sorted Pareto set if it is strictly cheaper than every point in it;
/// a last point of equal weight is then dominated and replaced. Fed in (weight, cost) order, this
/// keeps exactly the nondominated points, the first of exact duplicates.
fn push_pareto(points: &mut Vec<Point>, backs: &mut Vec<Back>, q: Point, b: Back) {
    if points.last().is_none_or(|last| q.cost < last.cost) {
        if points.last().is_some_and(|last| last.weight == q.weight) {
            points.pop();
            backs.pop();
        }
        points.push(q);
        backs.push(b);
    }
}

/// DP over Pareto sets. The current set `S` is sorted by weight, so adding one choice to every point
/// gives a weight-sorted stream (rounding is monotone). The group's streams are merged one at a
/// time into the new set, two-pointer style, keeping only nondominated points: each merge is linear,
/// so a group costs `O(k (|S| + |S'|))`. Only the group's own nondominated choices get a stream (a
/// dominated choice can be swapped for its dominator in any selection).
///
/// With `limit` (>= 0), partial sums that cannot finish within it are dropped: those whose weight
/// plus the lightest weight of every remaining group exceeds `limit` by more than the rounding of
/// `n` additions can cause (a relative `4 (n + 2) EPSILON`, all weights being >= 0). The slack makes
/// the pruning conservative: a kept point may still turn out too heavy, a dropped one never fits.
/// A stream stops at its first point over the bound.
fn run(groups: &[Vec<Choice>], limit: Option<f64>, options: &Options) -> Result<Dp, SolveError> {
    // rest[g]: the lightest weights of groups g.. summed (a real-number bound up to rounding).
    let mut rest = vec![0.0; groups.len() + 1];
    for g in (0..groups.len()).rev() {
        rest[g] = rest[g + 1] + min_weight(&groups[g]);
    }
    let slack = 1.0 + 4.0 * (groups.len() + 2) as f64 * f64::EPSILON;
    // Back-pointers are u32.
    let max_points = options.max_points.min(u32::MAX as usize);
    let mut points = vec![Point { weight: 0.0, cost: 0.0 }];
    let mut backs: Vec<Vec<Back>> = Vec::with_capacity(groups.len());
    let (mut acc, mut acc_backs): (Vec<Point>, Vec<Back>) = (Vec::new(), Vec::new());
    let (mut out, mut out_backs): (Vec<Point>, Vec<Back>) = (Vec::new(), Vec::new());
    for (g, choices) in groups.iter().enumerate() {
        let fits = |w: f64| limit.is_none_or(|limit| w + rest[g + 1] <= limit * slack);
        acc.clear();
        acc_backs.clear();
        for choice in nondominated(choices) {
            let c = choices[choice];
            let mut stream = points
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let q = Point {
                        weight: p.weight + c.weight,
                        cost: p.cost + c.cost,
                    };
                    (
                        q,
                        Back {
                            parent: i as u32,
                            choice: choice as u32,
                        },
                    )
                })
                .take_while(|(q, _)| fits(q.weight))
                .peekable();
            out.clear();
            out_backs.clear();
            let mut i = 0;
            loop {
                let from_acc = match (acc.get(i), stream.peek()) {
                    (None, None) => break,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (Some(a), Some((t, _))) => a.weight < t.weight || (a.weight == t.weight && a.cost <= t.cost),
                };
                if from_acc {
                    push_pareto(&mut out, &mut out_backs, acc[i], acc_backs[i]);
                    i += 1;
                } else if let Some((q, b)) = stream.next() {
                    push_pareto(&mut out, &mut out_backs, q, b);
                }
            }
            if out.len() > max_points {
                return Err(SolveError::TooManyPoints {
                    group: g,
                    points: out.len(),
                    max_points,
                });
            }
            std::mem::swap(&mut acc, &mut out);
            std::mem::swap(&mut acc_backs, &mut out_backs);
        }
        points.clone_from(&acc);
        backs.push(acc_backs.clone());
    }
    Ok(Dp { points, backs })
}
