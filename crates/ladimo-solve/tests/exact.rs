//! `solve` and `frontier` against brute force over every combination, plus errors and a large case.

use ladimo_solve::{BUDGET_REL_TOL, Choice, Options, SolveError, frontier, frontier_with, solve, solve_with};

/// splitmix64: a tiny seeded PRNG, enough for test instances.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A small random instance. `grid`: small integers, so that weights and costs tie often.
fn instance(rng: &mut Rng, grid: bool) -> Vec<Vec<Choice>> {
    let groups = 1 + rng.below(5) as usize;
    (0..groups)
        .map(|_| {
            let k = 1 + rng.below(5) as usize;
            (0..k)
                .map(|_| {
                    if grid {
                        Choice {
                            weight: rng.below(4) as f64,
                            cost: rng.below(5) as f64 - 1.0,
                        }
                    } else {
                        Choice {
                            weight: rng.unit() * 10.0,
                            cost: rng.unit() * 4.0 - 1.0,
                        }
                    }
                })
                .collect()
        })
        .collect()
}

/// Every combination as (weight, cost, picks), sums formed in group order.
fn all_combinations(groups: &[Vec<Choice>]) -> Vec<(f64, f64, Vec<usize>)> {
    let mut out = vec![(0.0, 0.0, Vec::new())];
    for choices in groups {
        let mut next = Vec::new();
        for (w, c, picks) in &out {
            for (i, choice) in choices.iter().enumerate() {
                let mut p = picks.clone();
                p.push(i);
                next.push((w + choice.weight, c + choice.cost, p));
            }
        }
        out = next;
    }
    out
}

fn sums(groups: &[Vec<Choice>], picks: &[usize]) -> (f64, f64) {
    assert_eq!(picks.len(), groups.len());
    let mut w = 0.0;
    let mut c = 0.0;
    for (g, &p) in picks.iter().enumerate() {
        w += groups[g][p].weight;
        c += groups[g][p].cost;
    }
    (w, c)
}

fn brute_pareto(groups: &[Vec<Choice>]) -> Vec<(f64, f64)> {
    let all = all_combinations(groups);
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (w, c, _) in &all {
        let dominated = all.iter().any(|(w2, c2, _)| (w2 <= w && c2 < c) || (w2 < w && c2 <= c));
        if !dominated && !out.contains(&(*w, *c)) {
            out.push((*w, *c));
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

fn limit(budget: f64) -> f64 {
    budget + BUDGET_REL_TOL * budget.abs()
}

#[test]
fn solve_equals_brute_force_on_random_instances() {
    let mut rng = Rng(0x1ad1_0001);
    let mut checked = 0;
    for case in 0..600 {
        let groups = instance(&mut rng, case % 2 == 0);
        let all = all_combinations(&groups);
        let min_w = all.iter().map(|a| a.0).fold(f64::INFINITY, f64::min);
        let max_w = all.iter().map(|a| a.0).fold(f64::NEG_INFINITY, f64::max);
        // A sweep from below the minimum to above the maximum, plus every achievable weight exactly.
        let mut budgets: Vec<f64> = (0..=12)
            .map(|i| min_w - 1.0 + (max_w - min_w + 2.0) * i as f64 / 12.0)
            .collect();
        budgets.extend(all.iter().map(|a| a.0));
        for budget in budgets {
            let feasible: Vec<_> = all.iter().filter(|a| a.0 <= limit(budget)).collect();
            match solve(&groups, budget) {
                Ok(sol) => {
                    assert!(
                        !feasible.is_empty(),
                        "case {case}: solved an infeasible budget {budget}"
                    );
                    let best = feasible.iter().map(|a| a.1).fold(f64::INFINITY, f64::min);
                    let lightest = feasible
                        .iter()
                        .filter(|a| a.1 == best)
                        .map(|a| a.0)
                        .fold(f64::INFINITY, f64::min);
                    assert_eq!(sol.cost, best, "case {case}, budget {budget}: {groups:?}");
                    assert_eq!(
                        sol.weight, lightest,
                        "case {case}, budget {budget}: ties prefer lower weight"
                    );
                    assert!(sol.weight <= limit(budget));
                    assert_eq!(
                        sums(&groups, &sol.picks),
                        (sol.weight, sol.cost),
                        "picks match the sums"
                    );
                    checked += 1;
                }
                Err(SolveError::BudgetTooSmall { minimum, .. }) => {
                    assert!(feasible.is_empty(), "case {case}: budget {budget} is feasible");
                    assert_eq!(minimum, min_w);
                }
                Err(e) => panic!("case {case}: {e}"),
            }
        }
    }
    assert!(checked > 3000, "only {checked} feasible budgets checked");
}

#[test]
fn frontier_equals_brute_force_pareto_set() {
    let mut rng = Rng(0x1ad1_0002);
    for case in 0..600 {
        let groups = instance(&mut rng, case % 2 == 1);
        let front = frontier(&groups).unwrap();
        let got: Vec<(f64, f64)> = front.iter().map(|p| (p.weight, p.cost)).collect();
        assert_eq!(got, brute_pareto(&groups), "case {case}: {groups:?}");
        for w in front.windows(2) {
            assert!(
                w[0].weight < w[1].weight && w[0].cost > w[1].cost,
                "case {case}: not strictly sorted"
            );
        }
        for p in &front {
            assert_eq!(
                sums(&groups, &p.picks),
                (p.weight, p.cost),
                "case {case}: picks match the sums"
            );
        }
    }
}

#[test]
fn solve_agrees_with_frontier() {
    let mut rng = Rng(0x1ad1_0003);
    for case in 0..200 {
        let groups = instance(&mut rng, false);
        let front = frontier(&groups).unwrap();
        for p in &front {
            let sol = solve(&groups, p.weight).unwrap();
            assert_eq!((sol.weight, sol.cost), (p.weight, p.cost), "case {case}");
        }
    }
}

#[test]
fn budget_too_small_names_the_minimum() {
    let groups = vec![
        vec![Choice { cost: 0.0, weight: 2.0 }, Choice { cost: 1.0, weight: 1.5 }],
        vec![
            Choice { cost: 0.0, weight: 3.0 },
            Choice {
                cost: 0.5,
                weight: 1.25,
            },
        ],
    ];
    let err = solve(&groups, 2.0).unwrap_err();
    assert_eq!(
        err,
        SolveError::BudgetTooSmall {
            budget: 2.0,
            minimum: 2.75
        }
    );
    assert!(err.to_string().contains("2.75"), "{err}");
    // Exactly the minimum is feasible.
    let sol = solve(&groups, 2.75).unwrap();
    assert_eq!(sol.picks, vec![1, 1]);
}

#[test]
fn budget_tolerance_only_covers_summation_order() {
    // 0.1 + 0.2 = 0.30000000000000004 > 0.3: within the relative tolerance.
    let groups = vec![
        vec![Choice { cost: 0.0, weight: 0.1 }],
        vec![Choice { cost: 0.0, weight: 0.2 }],
    ];
    assert!(solve(&groups, 0.3).is_ok());
    // A real shortfall is not tolerated.
    assert!(matches!(
        solve(&groups, 0.3 - 1e-9),
        Err(SolveError::BudgetTooSmall { .. })
    ));
}

#[test]
fn invalid_inputs_are_errors() {
    let ok = vec![Choice { cost: 1.0, weight: 1.0 }];
    assert_eq!(
        solve(&[ok.clone(), vec![]], 10.0).unwrap_err(),
        SolveError::EmptyGroup { group: 1 }
    );
    assert_eq!(frontier(&[vec![]]).unwrap_err(), SolveError::EmptyGroup { group: 0 });
    let nan_cost = vec![
        ok[0],
        Choice {
            cost: f64::NAN,
            weight: 1.0,
        },
    ];
    assert_eq!(
        solve(&[ok.clone(), nan_cost], 10.0).unwrap_err(),
        SolveError::NotFinite { group: 1, choice: 1 }
    );
    let inf_weight = vec![Choice {
        cost: 0.0,
        weight: f64::INFINITY,
    }];
    assert_eq!(
        frontier(&[inf_weight]).unwrap_err(),
        SolveError::NotFinite { group: 0, choice: 0 }
    );
    let negative = vec![Choice {
        cost: 0.0,
        weight: -1.0,
    }];
    assert!(matches!(
        solve(&[negative], 10.0),
        Err(SolveError::NegativeWeight {
            group: 0,
            choice: 0,
            ..
        })
    ));
    assert!(matches!(
        solve(std::slice::from_ref(&ok), f64::NAN),
        Err(SolveError::BudgetNotFinite { .. })
    ));
    let msg = SolveError::NotFinite { group: 3, choice: 7 }.to_string();
    assert!(msg.contains("group 3") && msg.contains("choice 7"), "{msg}");
}

#[test]
fn no_groups_is_the_empty_selection() {
    let sol = solve(&[], 0.0).unwrap();
    assert_eq!((sol.picks.len(), sol.cost, sol.weight), (0, 0.0, 0.0));
    let front = frontier(&[]).unwrap();
    assert_eq!(front.len(), 1);
    assert!(matches!(solve(&[], -1.0), Err(SolveError::BudgetTooSmall { .. })));
}

#[test]
fn too_many_points_is_an_error_not_an_approximation() {
    // Every combination of powers of two is nondominated: 2^10 frontier points.
    let groups: Vec<Vec<Choice>> = (0..10)
        .map(|g| {
            let w = (1u64 << g) as f64;
            vec![Choice { cost: w, weight: 0.0 }, Choice { cost: 0.0, weight: w }]
        })
        .collect();
    assert_eq!(frontier(&groups).unwrap().len(), 1024);
    let err = frontier_with(&groups, &Options { max_points: 100 }).unwrap_err();
    assert!(
        matches!(err, SolveError::TooManyPoints { max_points: 100, .. }),
        "{err}"
    );
    assert!(solve_with(&groups, 500.0, &Options { max_points: 100 }).is_err());
    let sol = solve(&groups, 500.0).unwrap();
    assert_eq!((sol.weight, sol.cost), (500.0, 1023.0 - 500.0));
}

/// A greedy choice (best marginal cost per weight) misses this optimum; the solver must not.
#[test]
fn beats_greedy_on_a_nonconvex_instance() {
    let groups = vec![
        vec![
            Choice {
                cost: 10.0,
                weight: 0.0,
            },
            Choice { cost: 9.0, weight: 1.0 },
            Choice { cost: 0.0, weight: 5.0 },
        ],
        vec![
            Choice {
                cost: 10.0,
                weight: 0.0,
            },
            Choice { cost: 9.0, weight: 1.0 },
            Choice { cost: 0.0, weight: 5.0 },
        ],
    ];
    let sol = solve(&groups, 6.0).unwrap();
    assert_eq!((sol.cost, sol.weight), (9.0, 6.0));
}

/// The typical size (30 layers x 40 policies), with per-layer trade-offs like real ones: cost falls
/// as weight grows, with noise. Must be quick: about a second in release.
#[test]
fn thirty_groups_of_forty_choices() {
    let mut rng = Rng(0x1ad1_0030);
    let groups: Vec<Vec<Choice>> = (0..30)
        .map(|_| {
            let scale = 0.5 + rng.unit();
            (0..40)
                .map(|_| {
                    let weight = 1.0 + 7.0 * rng.unit();
                    let cost = scale * (1.0 / weight) + 0.05 * rng.unit();
                    Choice { cost, weight }
                })
                .collect()
        })
        .collect();
    let start = std::time::Instant::now();
    let front = frontier(&groups).unwrap();
    let min_w: f64 = groups
        .iter()
        .map(|g| g.iter().map(|c| c.weight).fold(f64::INFINITY, f64::min))
        .sum();
    let max_w: f64 = groups
        .iter()
        .map(|g| g.iter().map(|c| c.weight).fold(0.0, f64::max))
        .sum();
    for i in 0..=5 {
        let budget = min_w + (max_w - min_w) * i as f64 / 5.0;
        let sol = solve(&groups, budget).unwrap();
        assert!(sol.weight <= limit(budget));
        let best = front
            .iter()
            .filter(|p| p.weight <= limit(budget))
            .map(|p| p.cost)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(sol.cost, best);
        assert_eq!(sums(&groups, &sol.picks), (sol.weight, sol.cost));
    }
    eprintln!(
        "frontier: {} points; frontier + 6 solves: {:?}",
        front.len(),
        start.elapsed()
    );
}
