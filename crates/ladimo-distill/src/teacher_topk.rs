//! The teacher's side of the polishes' loss: KL(teacher || student) per token, from the whole
//! teacher ([`kl`]) or from its top K next tokens computed once ([`TeacherTopK`]), and the file a
//! stage-1 run keeps those top K in ([`write_teacher_top_k`], read back by [`finetune`] when it
//! holds the same windows).
//!
//! [`finetune`]: crate::finetune::finetune

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{ModelError, Transformer};

use crate::DistillError;

/// Mean KL(teacher || student) per token over one batch of windows `ids` (`[b * seq_len]`), as a
/// differentiable scalar on the student's device.
pub(crate) fn kl(
    teacher: &Transformer,
    student: &Transformer,
    ids: &[u32],
    batch: usize,
) -> Result<Tensor<1>, ModelError> {
    let t = log_softmax(teacher.forward(ids_tensor(ids, batch, &teacher.device))?, 2);
    let t = Tensor::<3>::from_data(t.into_data(), &student.device);
    let s = log_softmax(student.forward(ids_tensor(ids, batch, &student.device))?, 2);
    let [b, n, v] = s.dims();
    let per_token = (t.clone().exp() * (t - s)).reshape([b * n, v]).sum_dim(1);
    Ok(per_token.mean())
}

/// The teacher's K most likely next tokens at every token of the training windows
/// (`teacher_top_k`), computed once: per token, K token ids, their log-probabilities, and the
/// probability left for all other tokens.
pub(crate) struct TeacherTopK {
    k: usize,
    seq_len: usize,
    /// Per training window, its row in the arrays below (`usize::MAX`: no step uses it).
    pub(crate) slot: Vec<usize>,
    /// `[cached windows * seq_len * k]`, in the order of `slot`.
    ids: Vec<u32>,
    logp: Vec<f32>,
    /// `[cached windows * seq_len]`: 1 - the K probabilities' sum, in [0, 1].
    rest: Vec<f32>,
}

impl TeacherTopK {
    /// An empty cache for `windows` windows of `seq_len` tokens, `capacity` of them to be filled.
    fn empty(k: usize, seq_len: usize, windows: usize, capacity: usize) -> Self {
        let tokens = capacity * seq_len;
        Self {
            k,
            seq_len,
            slot: vec![usize::MAX; windows],
            ids: Vec::with_capacity(tokens * k),
            logp: Vec::with_capacity(tokens * k),
            rest: Vec::with_capacity(tokens),
        }
    }

    /// Keep the top K of window `w`'s next-token log-probabilities (`[seq_len * vocab]`).
    fn push_window(&mut self, w: usize, t: &[f32], vocab: usize) {
        let k = self.k;
        self.slot[w] = self.rest.len() / self.seq_len;
        let mut order: Vec<u32> = Vec::with_capacity(vocab);
        for row in t.chunks_exact(vocab) {
            order.clear();
            order.extend(0..vocab as u32);
            // The K largest first (in no particular order among themselves).
            if k < vocab {
                order.select_nth_unstable_by(k, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            }
            let mut mass = 0f64;
            for &v in &order[..k] {
                self.ids.push(v);
                self.logp.push(row[v as usize]);
                mass += (row[v as usize] as f64).exp();
            }
            self.rest.push((1.0 - mass).clamp(0.0, 1.0) as f32);
        }
    }

    /// Run the teacher over the windows `used` of `windows`, `progress(done, total)` after each.
    pub(crate) fn new(
        teacher: &Transformer,
        windows: &[&[u32]],
        used: &[usize],
        k: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let seq_len = windows.first().map_or(0, |w| w.len());
        let vocab = teacher.config.vocab_size;
        let mut c = Self::empty(k.min(vocab), seq_len, windows.len(), used.len());
        for (i, &w) in used.iter().enumerate() {
            let t = to_vec(log_softmax(
                teacher.forward(ids_tensor(windows[w], 1, &teacher.device))?,
                2,
            ));
            c.push_window(w, &t, vocab);
            progress(i + 1, used.len());
        }
        Ok(c)
    }

    /// The metadata a saved cache carries: what its top K were computed on.
    fn tags(k: usize, seq_len: usize, windows: usize, fingerprint: &str) -> [(&'static str, String); 4] {
        [
            ("k", k.to_string()),
            ("seq_len", seq_len.to_string()),
            ("windows", windows.to_string()),
            ("fingerprint", fingerprint.to_string()),
        ]
    }

    /// Write every window's top K (all of them must be there) to `path` (through a `.part` file),
    /// with what they were computed on.
    fn save(&self, path: &Path, fingerprint: &str) -> Result<(), DistillError> {
        assert!(
            self.slot.iter().enumerate().all(|(w, &s)| s == w),
            "save needs every window, in order"
        );
        let bytes_u32 = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let bytes_f32 = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (ids, logp, rest) = (bytes_u32(&self.ids), bytes_f32(&self.logp), bytes_f32(&self.rest));
        let (rows, k) = (self.rest.len(), self.k);
        let bad = |e: safetensors::SafeTensorError| DistillError::Invalid(format!("{}: {e}", path.display()));
        let view = |dtype, shape: Vec<usize>, b| safetensors::tensor::TensorView::new(dtype, shape, b).map_err(bad);
        let views = vec![
            ("ids", view(safetensors::Dtype::U32, vec![rows, k], &ids)?),
            ("logp", view(safetensors::Dtype::F32, vec![rows, k], &logp)?),
            ("rest", view(safetensors::Dtype::F32, vec![rows], &rest)?),
        ];
        let meta = Self::tags(k, self.seq_len, self.slot.len(), fingerprint)
            .into_iter()
            .map(|(a, b)| (a.to_string(), b))
            .collect();
        let bytes = safetensors::serialize(views, Some(meta)).map_err(bad)?;
        Ok(ladimo_io::atomic::write_atomic(path, &bytes)?)
    }

    /// The cache saved at `path`, if it holds the top K of these `windows` windows of `seq_len`
    /// tokens with this `fingerprint` (else `None`, and the reason in the log).
    pub(crate) fn load(path: &Path, k: usize, seq_len: usize, windows: usize, fingerprint: &str) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
        let meta = header.metadata().clone().unwrap_or_default();
        let want = Self::tags(k, seq_len, windows, fingerprint);
        if let Some((key, v)) = want.iter().find(|(key, v)| meta.get(*key) != Some(v)) {
            tracing::warn!(
                "{}: {key} is {:?}, not {v}; the teacher runs again",
                path.display(),
                meta.get(*key)
            );
            return None;
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
        let words = |name: &str| -> Option<Vec<[u8; 4]>> {
            Some(
                st.tensor(name)
                    .ok()?
                    .data()
                    .chunks_exact(4)
                    .map(|c| c.try_into().unwrap())
                    .collect(),
            )
        };
        let ids: Vec<u32> = words("ids")?.into_iter().map(u32::from_le_bytes).collect();
        let logp: Vec<f32> = words("logp")?.into_iter().map(f32::from_le_bytes).collect();
        let rest: Vec<f32> = words("rest")?.into_iter().map(f32::from_le_bytes).collect();
        let rows = windows * seq_len;
        if ids.len() != rows * k || logp.len() != rows * k || rest.len() != rows {
            tracing::warn!("{}: wrong sizes; the teacher runs again", path.display());
            return None;
        }
        Some(Self {
            k,
            seq_len,
            slot: (0..windows).collect(),
            ids,
            logp,
            rest,
        })
    }

    /// Mean coarsened KL(teacher || student) per token over the training windows `batch`
    /// (indices into the windows the cache was built on), as a differentiable scalar:
    ///
    /// ```text
    /// sum_{v in top K} p_v (log p_v - log q_v) + p_rest (log p_rest - log q_rest)
    /// q_rest = 1 - sum_{v in top K} q_v
    /// ```
    pub(crate) fn kl(&self, student: &Transformer, ids: &[u32], batch: &[usize]) -> Result<Tensor<1>, ModelError> {
        let (k, n) = (self.k, self.seq_len);
        let device = &student.device;
        let s = log_softmax(student.forward(ids_tensor(ids, batch.len(), device))?, 2);
        let [b, n_, v] = s.dims();
        debug_assert_eq!((b, n_), (batch.len(), n));
        let rows = b * n;
        let (mut idx, mut logp, mut rest) = (
            Vec::with_capacity(rows * k),
            Vec::with_capacity(rows * k),
            Vec::with_capacity(rows),
        );
        for &w in batch {
            let w = self.slot[w];
            assert!(w != usize::MAX, "a step uses a window the teacher's pass skipped");
            idx.extend(self.ids[w * n * k..(w + 1) * n * k].iter().map(|&v| v as i64));
            logp.extend_from_slice(&self.logp[w * n * k..(w + 1) * n * k]);
            rest.extend_from_slice(&self.rest[w * n..(w + 1) * n]);
        }
        // The rest bucket's term, p_rest * log p_rest (0 at p_rest = 0), is a constant: host side.
        let rest_entropy: f64 = rest
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| p as f64 * (p as f64).ln())
            .sum();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [rows, k]), device);
        let lp = Tensor::<2>::from_data(TensorData::new(logp, [rows, k]), device);
        let rest = Tensor::<2>::from_data(TensorData::new(rest, [rows, 1]), device);
        let sk = s.reshape([rows, v]).gather(1, idx);
        let head = (lp.clone().exp() * (lp - sk.clone())).sum();
        // 1 - sum q_v loses precision when the K tokens hold nearly all of the student's mass;
        // the floor keeps the log finite (its gradient is then 0, and p_rest is tiny there too).
        let q_rest = sk.exp().sum_dim(1).neg().add_scalar(1.0).clamp_min(1e-6);
        let tail = (rest * q_rest.log()).sum().neg().add_scalar(rest_entropy);
        Ok((head + tail).div_scalar(rows as f64))
    }
}

/// Where a stage-1 run keeps the teacher's top `k` next tokens on its calibration windows, for a
/// polish with `teacher_top_k = k` (see [`write_teacher_top_k`]).
pub fn teacher_top_k_path(run_dir: &Path, k: usize) -> PathBuf {
    run_dir.join(format!("teacher-top{k}.safetensors"))
}

/// Write the teacher's top `k` next tokens on every window of `tokens` (cut into windows of
/// `seq_len`) to [`teacher_top_k_path`], from `hidden(w)`: the teacher's residual stream after
/// its last layer on window `w` (`[1, seq_len, hidden]`, before the final norm). A student-input
/// stage 1 carries that stream anyway, so a polish that reads this file skips its own teacher
/// pass. Returns the seconds it took.
pub fn write_teacher_top_k(
    teacher: &Transformer,
    tokens: &[u32],
    seq_len: usize,
    k: usize,
    run_dir: &Path,
    mut hidden: impl FnMut(usize) -> Tensor<3>,
) -> Result<f64, DistillError> {
    let t = Instant::now();
    let vocab = teacher.config.vocab_size;
    let k = k.min(vocab);
    let windows = tokens.len() / seq_len.max(1);
    let mut c = TeacherTopK::empty(k, seq_len, windows, windows);
    for w in 0..windows {
        let h = teacher.norm.forward(hidden(w));
        c.push_window(w, &to_vec(log_softmax(teacher.logits(h), 2)), vocab);
    }
    let fp = crate::capture::fingerprint(teacher, &tokens[..windows * seq_len], seq_len);
    c.save(&teacher_top_k_path(run_dir, k), &fp)?;
    Ok(t.elapsed().as_secs_f64())
}
