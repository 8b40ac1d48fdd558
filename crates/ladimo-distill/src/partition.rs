//! Expert construction: cut a dense SwiGLU FFN's intermediate neurons into routed experts, plus
//! optional always-on shared neurons.
//!
//! A neuron `i` of the FFN is row `i` of gate and up and column `i` of down; any set of neurons is
//! itself a smaller SwiGLU FFN, and the dense output is the sum of the outputs of a partition's parts.
//!
//! Strategies ([`PartitionStrategy`]):
//! - [`Contiguous`]: neurons in index order, cut into consecutive runs (a baseline: index order is
//!   arbitrary in a trained model).
//! - [`Random`]: a seeded shuffle, then cut (the other baseline).
//! - [`BalancedKMeans`]: balanced k-means on each neuron's weights (its gate row and up row, each
//!   L2-normalised, concatenated): neurons reading similar directions of the hidden state end up in
//!   one expert, so a router can pick the expert from the input.
//! - [`CoActivation`]: the same balanced k-means on each neuron's activation pattern (the
//!   L2-normalised column of |activation| over a sample of calibration tokens): neurons firing on
//!   the same tokens end up together, so for a token few experts carry most of the output.
//!
//! Balanced k-means: k-means++ initialisation (seeded), then Lloyd iterations where the assignment
//! step gives every cluster exactly its requested size — a greedy pass over (neuron, centroid) pairs
//! by increasing distance subject to capacity, refined by pairwise swaps between clusters while a
//! swap lowers the total distance — and the update step takes each cluster's mean.
//!
//! [`build_partition`] takes the `shared` most frequently active neurons (see
//! [`ActivationSample::active_frequency`]) as always-on shared neurons and splits the rest into
//! experts of equal size; [`router_from_partition`] initialises a router from the experts' gate rows.

use ladimo_io::HostTensor;
use ladimo_moe::HostFfn;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The neurons of one FFN, cut into routed experts plus optional always-on shared neurons.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Partition {
    /// Each expert's neuron indices, ascending.
    pub experts: Vec<Vec<usize>>,
    /// The always-on shared neurons, ascending (may be empty).
    pub shared: Vec<usize>,
}

impl Partition {
    /// Every neuron `0..inter` appears exactly once across shared + experts, and no expert is empty.
    pub fn validate(&self, inter: usize) -> Result<(), String> {
        if self.experts.is_empty() {
            return Err("partition has no experts".into());
        }
        let mut seen = vec![false; inter];
        let mut mark = |i: usize, what: &str| -> Result<(), String> {
            if i >= inter {
                return Err(format!("{what}: neuron {i} out of range (the FFN has {inter} neurons)"));
            }
            if std::mem::replace(&mut seen[i], true) {
                return Err(format!("{what}: neuron {i} appears more than once in the partition"));
            }
            Ok(())
        };
        for &i in &self.shared {
            mark(i, "shared")?;
        }
        for (e, ex) in self.experts.iter().enumerate() {
            if ex.is_empty() {
                return Err(format!("expert {e} is empty"));
            }
            for &i in ex {
                mark(i, &format!("expert {e}"))?;
            }
        }
        let missing: Vec<usize> = (0..inter).filter(|&i| !seen[i]).collect();
        if !missing.is_empty() {
            let shown: Vec<String> = missing.iter().take(8).map(|i| i.to_string()).collect();
            return Err(format!(
                "{} of {inter} neurons are in neither an expert nor shared (first: {}{})",
                missing.len(),
                shown.join(", "),
                if missing.len() > 8 { ", ..." } else { "" }
            ));
        }
        Ok(())
    }

    pub fn expert_sizes(&self) -> Vec<usize> {
        self.experts.iter().map(Vec::len).collect()
    }
}

/// Per-neuron activation statistics over calibration tokens, for co-activation clustering and shared
/// experts.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationSample {
    pub tokens: usize,
    pub inter: usize,
    /// `[tokens, inter]` row-major: the intermediate activation `silu(gate·x) * (up·x)` of each neuron
    /// for a sample of calibration tokens.
    pub values: Vec<f32>,
}

impl ActivationSample {
    /// Compute from an FFN and hidden inputs `x`: `[tokens, hidden]` row-major.
    pub fn compute(ffn: &HostFfn, x: &[f32], tokens: usize) -> Self {
        let (h, f) = (ffn.hidden_size(), ffn.intermediate_size());
        assert_eq!(
            x.len(),
            tokens * h,
            "ActivationSample::compute: x must be [{tokens}, {h}]"
        );
        let mut values = vec![0f32; tokens * f];
        for (xt, out) in x.chunks_exact(h).zip(values.chunks_exact_mut(f)) {
            for ((o, g), u) in out
                .iter_mut()
                .zip(ffn.gate.data.chunks_exact(h))
                .zip(ffn.up.data.chunks_exact(h))
            {
                let g = dot(g, xt);
                *o = silu(g) * dot(u, xt);
            }
        }
        Self {
            tokens,
            inter: f,
            values,
        }
    }

    /// How often each neuron is "active": among the top 25% (at least one) of |activation| of its
    /// token; a frequency in [0, 1] per neuron (all zeros when there are no tokens).
    pub fn active_frequency(&self) -> Vec<f32> {
        let f = self.inter;
        let mut count = vec![0u32; f];
        if f == 0 || self.tokens == 0 {
            return vec![0.0; f];
        }
        let top = f.div_ceil(4);
        let mut idx: Vec<usize> = Vec::with_capacity(f);
        for row in self.values.chunks_exact(f) {
            idx.clear();
            idx.extend(0..f);
            // Largest |a| first; ties by index, so the result does not depend on the selection algorithm.
            let cmp = |&a: &usize, &b: &usize| row[b].abs().total_cmp(&row[a].abs()).then(a.cmp(&b));
            if top < f {
                idx.select_nth_unstable_by(top - 1, cmp);
            }
            for &i in &idx[..top] {
                count[i] += 1;
            }
        }
        count.into_iter().map(|c| c as f32 / self.tokens as f32).collect()
    }

    /// Each neuron's column of |activation| over the tokens, L2-normalised: `[inter, tokens]` row-major.
    fn patterns(&self, neurons: &[usize]) -> Vec<f32> {
        let t = self.tokens;
        let mut out = vec![0f32; neurons.len() * t];
        for (k, row) in self.values.chunks_exact(self.inter).enumerate() {
            for (j, &i) in neurons.iter().enumerate() {
                out[j * t + k] = row[i].abs();
            }
        }
        for r in out.chunks_exact_mut(t.max(1)) {
            normalize(r);
        }
        out
    }
}

/// A way of cutting neurons into experts.
pub trait PartitionStrategy {
    fn name(&self) -> String;

    /// Cut the neurons `neurons` (a subset of `0..inter`, the ones not taken as shared) into
    /// `sizes.len()` experts with exactly those sizes (`sizes` sum to `neurons.len()`). Each expert is
    /// returned ascending.
    fn split(
        &self,
        ffn: &HostFfn,
        acts: Option<&ActivationSample>,
        neurons: &[usize],
        sizes: &[usize],
    ) -> Result<Vec<Vec<usize>>, String>;
}

/// Consecutive runs of the neurons in index order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Contiguous;

/// A seeded shuffle of the neurons, cut into runs.
#[derive(Debug, Clone, Copy)]
pub struct Random {
    pub seed: u64,
}

/// Balanced k-means on the neurons' gate and up weight rows (each L2-normalised, concatenated).
#[derive(Debug, Clone, Copy)]
pub struct BalancedKMeans {
    pub seed: u64,
    /// Maximum number of Lloyd iterations (stops early once the assignment no longer changes).
    pub iters: usize,
}

/// Balanced k-means on the neurons' activation patterns over the calibration tokens (the
/// L2-normalised column of |activation|); needs an [`ActivationSample`].
#[derive(Debug, Clone, Copy)]
pub struct CoActivation {
    pub seed: u64,
    /// Maximum number of Lloyd iterations (stops early once the assignment no longer changes).
    pub iters: usize,
}

/// Default number of Lloyd iterations for [`strategy_by_name`].
pub const DEFAULT_KMEANS_ITERS: usize = 25;

impl PartitionStrategy for Contiguous {
    fn name(&self) -> String {
        "contiguous".into()
    }

    fn split(
        &self,
        ffn: &HostFfn,
        _acts: Option<&ActivationSample>,
        neurons: &[usize],
        sizes: &[usize],
    ) -> Result<Vec<Vec<usize>>, String> {
        check_split(ffn, neurons, sizes)?;
        let mut order = neurons.to_vec();
        order.sort_unstable();
        Ok(cut(&order, sizes))
    }
}

impl PartitionStrategy for Random {
    fn name(&self) -> String {
        format!("random(seed={})", self.seed)
    }

    fn split(
        &self,
        ffn: &HostFfn,
        _acts: Option<&ActivationSample>,
        neurons: &[usize],
        sizes: &[usize],
    ) -> Result<Vec<Vec<usize>>, String> {
        check_split(ffn, neurons, sizes)?;
        let mut order = neurons.to_vec();
        order.sort_unstable();
        order.shuffle(&mut StdRng::seed_from_u64(self.seed));
        Ok(cut(&order, sizes))
    }
}

impl PartitionStrategy for BalancedKMeans {
    fn name(&self) -> String {
        format!("kmeans(seed={}, iters={})", self.seed, self.iters)
    }

    fn split(
        &self,
        ffn: &HostFfn,
        _acts: Option<&ActivationSample>,
        neurons: &[usize],
        sizes: &[usize],
    ) -> Result<Vec<Vec<usize>>, String> {
        check_split(ffn, neurons, sizes)?;
        let h = ffn.hidden_size();
        let d = 2 * h;
        let mut data = vec![0f32; neurons.len() * d];
        let s = std::f32::consts::FRAC_1_SQRT_2;
        for (row, &i) in data.chunks_exact_mut(d).zip(neurons) {
            let (g, u) = row.split_at_mut(h);
            g.copy_from_slice(&ffn.gate.data[i * h..(i + 1) * h]);
            u.copy_from_slice(&ffn.up.data[i * h..(i + 1) * h]);
            normalize(g);
            normalize(u);
            row.iter_mut().for_each(|v| *v *= s);
        }
        let labels = balanced_kmeans(&data, d, sizes, self.seed, self.iters);
        Ok(groups_from_labels(&labels, neurons, sizes))
    }
}

impl PartitionStrategy for CoActivation {
    fn name(&self) -> String {
        format!("coactivation(seed={}, iters={})", self.seed, self.iters)
    }

    fn split(
        &self,
        ffn: &HostFfn,
        acts: Option<&ActivationSample>,
        neurons: &[usize],
        sizes: &[usize],
    ) -> Result<Vec<Vec<usize>>, String> {
        check_split(ffn, neurons, sizes)?;
        let acts = acts.ok_or("coactivation partitioning needs an activation sample (none was given)")?;
        check_acts(acts, ffn)?;
        if acts.tokens == 0 {
            return Err("coactivation partitioning needs an activation sample with at least one token".into());
        }
        let data = acts.patterns(neurons);
        let labels = balanced_kmeans(&data, acts.tokens, sizes, self.seed, self.iters);
        Ok(groups_from_labels(&labels, neurons, sizes))
    }
}

/// A complete partition: the `shared` most frequently active neurons (needs `acts` when
/// `shared > 0`), then the rest split by `strategy` into `n_experts` experts of equal size (the first
/// `rem` experts one neuron larger when it does not divide).
pub fn build_partition(
    ffn: &HostFfn,
    acts: Option<&ActivationSample>,
    strategy: &dyn PartitionStrategy,
    n_experts: usize,
    shared: usize,
) -> Result<Partition, String> {
    let inter = ffn.intermediate_size();
    check_ffn(ffn)?;
    if let Some(a) = acts {
        check_acts(a, ffn)?;
    }
    if n_experts == 0 {
        return Err("n_experts must be at least 1".into());
    }
    if shared >= inter {
        return Err(format!(
            "{shared} shared neurons leave none of the FFN's {inter} neurons for the experts"
        ));
    }
    let routed = inter - shared;
    if n_experts > routed {
        return Err(format!(
            "cannot cut {routed} neurons ({inter} minus {shared} shared) into {n_experts} non-empty experts"
        ));
    }
    let shared_idx: Vec<usize> = if shared == 0 {
        Vec::new()
    } else {
        let acts = acts
            .ok_or_else(|| format!("choosing {shared} shared neurons needs an activation sample (none was given)"))?;
        let freq = acts.active_frequency();
        let mut order: Vec<usize> = (0..inter).collect();
        order.sort_by(|&a, &b| freq[b].total_cmp(&freq[a]).then(a.cmp(&b)));
        let mut s = order[..shared].to_vec();
        s.sort_unstable();
        s
    };
    let mut is_shared = vec![false; inter];
    shared_idx.iter().for_each(|&i| is_shared[i] = true);
    let neurons: Vec<usize> = (0..inter).filter(|&i| !is_shared[i]).collect();
    let (base, rem) = (routed / n_experts, routed % n_experts);
    let sizes: Vec<usize> = (0..n_experts).map(|e| base + usize::from(e < rem)).collect();

    let mut experts = strategy.split(ffn, acts, &neurons, &sizes)?;
    let name = strategy.name();
    if experts.len() != n_experts {
        return Err(format!(
            "strategy {name} returned {} experts, not {n_experts}",
            experts.len()
        ));
    }
    for (e, (ex, &want)) in experts.iter_mut().zip(&sizes).enumerate() {
        if ex.len() != want {
            return Err(format!(
                "strategy {name} returned expert {e} of {} neurons, not {want}",
                ex.len()
            ));
        }
        ex.sort_unstable();
    }
    let p = Partition {
        experts,
        shared: shared_idx,
    };
    p.validate(inter)
        .map_err(|e| format!("strategy {name} returned an invalid partition: {e}"))?;
    Ok(p)
}

/// Router initialisation from a partition: row `e` = mean of the gate rows of expert `e`'s neurons,
/// rescaled so every row has the L2 norm of the average gate row (the mean norm over all of the FFN's
/// gate rows). `[n_experts, hidden]`, PyTorch layout. Deterministic.
pub fn router_from_partition(ffn: &HostFfn, p: &Partition) -> HostTensor {
    let h = ffn.hidden_size();
    let rows = ffn.gate.data.chunks_exact(h);
    let n_rows = rows.len().max(1);
    let target = rows.map(|r| dot(r, r).sqrt() as f64).sum::<f64>() / n_rows as f64;
    let mut out = vec![0f32; p.experts.len() * h];
    for (row, ex) in out.chunks_exact_mut(h).zip(&p.experts) {
        let mut acc = vec![0f64; h];
        for &i in ex {
            for (a, &g) in acc.iter_mut().zip(&ffn.gate.data[i * h..(i + 1) * h]) {
                *a += g as f64;
            }
        }
        let norm = acc.iter().map(|a| a * a).sum::<f64>().sqrt();
        let scale = if norm > 0.0 { target / norm } else { 0.0 };
        for (o, a) in row.iter_mut().zip(&acc) {
            *o = (a * scale) as f32;
        }
    }
    HostTensor::new(vec![p.experts.len(), h], out)
}

/// The strategy names [`strategy_by_name`] knows.
pub const STRATEGY_NAMES: [&str; 4] = ["contiguous", "random", "kmeans", "coactivation"];

/// Strategy by name for configs/CLI: "contiguous", "random", "kmeans", "coactivation" (with `seed`;
/// k-means strategies run up to [`DEFAULT_KMEANS_ITERS`] Lloyd iterations).
pub fn strategy_by_name(name: &str, seed: u64) -> Result<Box<dyn PartitionStrategy>, String> {
    let iters = DEFAULT_KMEANS_ITERS;
    Ok(match name {
        "contiguous" => Box::new(Contiguous),
        "random" => Box::new(Random { seed }),
        "kmeans" => Box::new(BalancedKMeans { seed, iters }),
        "coactivation" => Box::new(CoActivation { seed, iters }),
        _ => {
            return Err(format!(
                "unknown partition strategy {name:?}; expected one of: {}",
                STRATEGY_NAMES.join(", ")
            ));
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn check_ffn(ffn: &HostFfn) -> Result<(), String> {
    let (f, h) = (ffn.intermediate_size(), ffn.hidden_size());
    let ok = ffn.gate.shape == [f, h] && ffn.up.shape == [f, h] && ffn.down.shape == [h, f];
    if ok && f > 0 && h > 0 {
        Ok(())
    } else {
        Err(format!(
            "gate {:?}, up {:?}, down {:?} do not form a SwiGLU FFN",
            ffn.gate.shape, ffn.up.shape, ffn.down.shape
        ))
    }
}

fn check_acts(acts: &ActivationSample, ffn: &HostFfn) -> Result<(), String> {
    let f = ffn.intermediate_size();
    if acts.inter != f || acts.values.len() != acts.tokens * acts.inter {
        return Err(format!(
            "activation sample of {} tokens x {} neurons ({} values) does not match the FFN's {f} neurons",
            acts.tokens,
            acts.inter,
            acts.values.len()
        ));
    }
    Ok(())
}

fn check_split(ffn: &HostFfn, neurons: &[usize], sizes: &[usize]) -> Result<(), String> {
    check_ffn(ffn)?;
    let f = ffn.intermediate_size();
    if sizes.is_empty() {
        return Err("no experts requested".into());
    }
    if let Some(e) = sizes.iter().position(|&s| s == 0) {
        return Err(format!("expert {e} would be empty"));
    }
    let total: usize = sizes.iter().sum();
    if total != neurons.len() {
        return Err(format!(
            "expert sizes sum to {total}, but there are {} neurons to split",
            neurons.len()
        ));
    }
    let mut seen = vec![false; f];
    for &i in neurons {
        if i >= f {
            return Err(format!("neuron {i} out of range (the FFN has {f} neurons)"));
        }
        if std::mem::replace(&mut seen[i], true) {
            return Err(format!("neuron {i} listed twice"));
        }
    }
    Ok(())
}

/// Cut `order` into consecutive runs of `sizes`, each sorted.
fn cut(order: &[usize], sizes: &[usize]) -> Vec<Vec<usize>> {
    let mut start = 0;
    sizes
        .iter()
        .map(|&s| {
            let mut g = order[start..start + s].to_vec();
            g.sort_unstable();
            start += s;
            g
        })
        .collect()
}

/// Experts from cluster labels (cluster `c` has `sizes[c]` members), each sorted; among clusters of
/// equal size, ordered by their smallest neuron so the expert order does not depend on the cluster
/// numbering.
fn groups_from_labels(labels: &[usize], neurons: &[usize], sizes: &[usize]) -> Vec<Vec<usize>> {
    let mut groups = vec![Vec::new(); sizes.len()];
    for (&l, &i) in labels.iter().zip(neurons) {
        groups[l].push(i);
    }
    groups.iter_mut().for_each(|g| g.sort_unstable());
    let mut slots: Vec<usize> = (0..sizes.len()).collect();
    slots.sort_by_key(|&c| sizes[c]);
    // Within each run of equal size, reassign the groups to the slots by increasing first neuron.
    let mut out = vec![Vec::new(); sizes.len()];
    for run in slots.chunk_by(|&a, &b| sizes[a] == sizes[b]) {
        let mut gs: Vec<Vec<usize>> = run.iter().map(|&c| std::mem::take(&mut groups[c])).collect();
        gs.sort_by_key(|g| g.first().copied());
        let mut slot_order = run.to_vec();
        slot_order.sort_unstable();
        for (s, g) in slot_order.into_iter().zip(gs) {
            out[s] = g;
        }
    }
    out
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Dot product with eight independent accumulators (vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

fn normalize(v: &mut [f32]) {
    let n = dot(v, v).sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Balanced k-means on the rows of `data` (`[n, d]`, row-major, rows L2-normalised or zero): returns
/// each row's cluster, cluster `c` getting exactly `sizes[c]` rows. Deterministic for a seed.
fn balanced_kmeans(data: &[f32], d: usize, sizes: &[usize], seed: u64, iters: usize) -> Vec<usize> {
    let n = data.len() / d;
    let k = sizes.len();
    debug_assert_eq!(sizes.iter().sum::<usize>(), n);
    if k == 1 {
        return vec![0; n];
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut centroids = kmeans_pp(data, d, k, &mut rng);
    let mut dist = vec![0f32; n * k];
    let mut labels: Vec<usize> = Vec::new();
    for _ in 0..iters.max(1) {
        distances(data, d, &centroids, &mut dist);
        let new = balanced_assign(&dist, n, sizes);
        let done = new == labels;
        labels = new;
        if done {
            break;
        }
        // Update: each cluster's mean.
        centroids.iter_mut().for_each(|c| *c = 0.0);
        for (row, &l) in data.chunks_exact(d).zip(&labels) {
            for (c, &x) in centroids[l * d..(l + 1) * d].iter_mut().zip(row) {
                *c += x;
            }
        }
        for (c, &s) in centroids.chunks_exact_mut(d).zip(sizes) {
            c.iter_mut().for_each(|v| *v /= s as f32);
        }
    }
    labels
}

/// k-means++ seeding: the first centroid a uniformly random row, each next one a row drawn with
/// probability proportional to its squared distance to the nearest centroid so far.
fn kmeans_pp(data: &[f32], d: usize, k: usize, rng: &mut StdRng) -> Vec<f32> {
    let n = data.len() / d;
    let row = |i: usize| &data[i * d..(i + 1) * d];
    let mut centroids = Vec::with_capacity(k * d);
    let first = rng.random_range(0..n);
    centroids.extend_from_slice(row(first));
    let mut best = vec![f32::INFINITY; n];
    for c in 1..k {
        let last = &centroids[(c - 1) * d..c * d];
        let ln = dot(last, last);
        for (i, b) in best.iter_mut().enumerate() {
            let r = row(i);
            let dd = (dot(r, r) + ln - 2.0 * dot(r, last)).max(0.0);
            *b = b.min(dd);
        }
        let total: f64 = best.iter().map(|&b| b as f64).sum();
        let pick = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            let mut pick = n - 1;
            for (i, &b) in best.iter().enumerate() {
                target -= b as f64;
                if target < 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        } else {
            // All rows coincide with a centroid: any row will do.
            rng.random_range(0..n)
        };
        centroids.extend_from_slice(row(pick));
    }
    centroids
}

/// Squared Euclidean distances `[n, k]` from each row to each centroid.
fn distances(data: &[f32], d: usize, centroids: &[f32], out: &mut [f32]) {
    let k = centroids.len() / d;
    let cn: Vec<f32> = centroids.chunks_exact(d).map(|c| dot(c, c)).collect();
    for (row, o) in data.chunks_exact(d).zip(out.chunks_exact_mut(k)) {
        let rn = dot(row, row);
        for ((o, c), &cn) in o.iter_mut().zip(centroids.chunks_exact(d)).zip(&cn) {
            *o = (rn + cn - 2.0 * dot(row, c)).max(0.0);
        }
    }
}

/// Assign each of `n` rows to a cluster, cluster `c` getting exactly `sizes[c]` rows, approximately
/// minimising the total distance: greedily by increasing distance subject to capacity, then pairwise
/// swaps between clusters while they lower the total.
fn balanced_assign(dist: &[f32], n: usize, sizes: &[usize]) -> Vec<usize> {
    let k = sizes.len();
    // Greedy over (row, cluster) pairs by increasing distance; ties by position (stable sort).
    let mut pairs: Vec<u32> = (0..(n * k) as u32).collect();
    pairs.sort_by(|&a, &b| dist[a as usize].total_cmp(&dist[b as usize]));
    let mut labels = vec![usize::MAX; n];
    let mut room = sizes.to_vec();
    let mut left = n;
    for p in pairs {
        let (i, c) = (p as usize / k, p as usize % k);
        if labels[i] == usize::MAX && room[c] > 0 {
            labels[i] = c;
            room[c] -= 1;
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    // Swap refinement: for clusters a < b, pair the members of a most eager to move to b with the
    // members of b most eager to move to a, swapping while the pair's total gain is positive.
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); k];
    for (i, &l) in labels.iter().enumerate() {
        members[l].push(i);
    }
    let d = |i: usize, c: usize| dist[i * k + c];
    for _pass in 0..20 {
        let mut swapped = false;
        for a in 0..k {
            for b in a + 1..k {
                let gains = |from: usize, to: usize| {
                    let mut g: Vec<(f32, usize)> = members[from].iter().map(|&i| (d(i, from) - d(i, to), i)).collect();
                    g.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
                    g
                };
                let (ga, gb) = (gains(a, b), gains(b, a));
                let mut changed = false;
                for (&(g1, i), &(g2, j)) in ga.iter().zip(&gb) {
                    if g1 + g2 <= 1e-7 {
                        break;
                    }
                    labels[i] = b;
                    labels[j] = a;
                    changed = true;
                }
                if changed {
                    swapped = true;
                    members[a].clear();
                    members[b].clear();
                    for (i, &l) in labels.iter().enumerate() {
                        if l == a || l == b {
                            members[l].push(i);
                        }
                    }
                }
            }
        }
        if !swapped {
            break;
        }
    }
    labels
}

/// Scale a router so that its logits on the sample tokens `x` (`[tokens, hidden]`) have standard
/// deviation `target_std` around each token's mean. The ranking of experts per token (which
/// experts are chosen) is unchanged; the softmax becomes flat enough that renormalised top-k
/// weights start near `1 / k`, so a block whose combine scale is `k` starts close to the sum of
/// its chosen experts (the dense FFN, when all run) instead of one expert multiplied by `k`.
pub fn calibrate_router(router: &mut HostTensor, x: &[f32], tokens: usize, target_std: f32) {
    let (e, h) = (router.shape[0], router.shape[1]);
    let (mut sum2, mut count) = (0f64, 0usize);
    for t in 0..tokens {
        let xt = &x[t * h..(t + 1) * h];
        let logits: Vec<f64> = router.data.chunks_exact(h).map(|r| dot(r, xt) as f64).collect();
        let mean = logits.iter().sum::<f64>() / e as f64;
        sum2 += logits.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>();
        count += e;
    }
    let std = (sum2 / count.max(1) as f64).sqrt();
    if std > 0.0 {
        let s = (target_std as f64 / std) as f32;
        router.data.iter_mut().for_each(|v| *v *= s);
    }
}
