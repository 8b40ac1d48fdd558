//! Stage 1 on the student's own hidden states (`TrainConfig::inputs = Student`).
//!
//! LaDiMo trains every block on the dense teacher's hidden states, so each layer is independent.
//! At inference, though, layer `l` sees hidden states that the blocks of layers `0..l` have
//! already bent away from the teacher's, and the errors add up over the layers. Here the layers
//! are trained in order: layer `l`'s FFN inputs come from the model whose layers `0..l` are the
//! blocks trained so far (under the training policy), and its target is the dense FFN's output on
//! those same inputs, moved by `residual_correction` towards what would put the residual stream
//! back on the teacher's:
//!
//! ```text
//! h_s  student residual stream at layer l's input     h_t  the teacher's
//! (a_s, x) = attention_part(h_s)                      h_t' = teacher layer l (h_t)
//! y = ffn_dense(x) + c * ((h_t' - a_s) / residual_multiplier - ffn_dense(x))
//! train block l on (x, y); h_s' = a_s + residual_multiplier * block(x)
//! ```
//!
//! No capture is written: the streams live in memory as f32, `(4 + [c > 0]) * tokens * hidden * 4`
//! bytes (SmolLM2-135M, 100K tokens: 1.2 GB; a 7B LLaMA: 8.2 GB). A run covering layers `a..b`
//! needs layers `0..a` finished in the output folder (it replays them), so a model can still be
//! split across runs, one after the other. Finished layers are replayed from their saved blocks,
//! so a killed run resumes and ends with the same result.
//!
//! With `c > 0` the teacher's stream reaches the last layer here anyway: for a polish that keeps
//! the teacher's top K next tokens, [`run_layers_sequential`] turns it into those top K
//! (final norm, head, one pass over the windows) instead of the polish running the whole teacher.

use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use ladimo_model::util::ids_tensor;
use ladimo_model::{FeedForward, ModelError, Transformer};
use ladimo_moe::HostFfn;

use crate::DistillError;
use crate::run_dir::{finished, load_layer_block, save_layer, write_summary};
use crate::stream::{ffn_err, put, window};
use crate::train::{Inputs, LayerReport, TrainConfig, train_layer};

/// Train layers `layers` in order on the student's hidden states (see the module doc), writing
/// to `out_dir` like `train::run_layers`. `model` is the dense teacher; `tokens` are cut into
/// windows of `seq_len` (whole windows only). `progress(layer, step, total, loss)`.
///
/// With `teacher_top_k = K > 0`, a run that ends at the last layer with `residual_correction >
/// 0` (so that it carries the teacher's stream) also writes the teacher's top K next tokens on
/// every window ([`teacher_topk::write_teacher_top_k`](crate::teacher_topk::write_teacher_top_k)): a
/// polish with `teacher_top_k = K` then reads them instead of running the teacher. 0: none.
#[allow(clippy::too_many_arguments)]
pub fn run_layers_sequential(
    ckpt: &ladimo_io::Checkpoint,
    model: &Transformer,
    tokens: &[u32],
    seq_len: usize,
    out_dir: &Path,
    layers: Range<usize>,
    cfg: &TrainConfig,
    teacher_top_k: usize,
    mut progress: impl FnMut(usize, usize, usize, f64),
) -> Result<Vec<LayerReport>, DistillError> {
    let c = &model.config;
    if cfg.inputs != Inputs::Student {
        return Err(DistillError::Invalid(
            "run_layers_sequential needs inputs = \"student\"".into(),
        ));
    }
    if layers.is_empty() || layers.end > c.num_layers {
        return Err(DistillError::Invalid(format!(
            "layer range {layers:?} is outside the model's {} layers",
            c.num_layers
        )));
    }
    let corr = cfg.residual_correction;
    if !(0.0..=1.0).contains(&corr) {
        return Err(DistillError::Invalid(format!(
            "residual_correction {corr}: expected a number from 0 to 1"
        )));
    }
    if corr > 0.0 && c.use_post_norm {
        return Err(DistillError::Invalid(
            "residual_correction needs the FFN output added to the residual stream as it is; \
             this model has Peri-LN post norms (use_post_norm): set residual_correction = 0"
                .into(),
        ));
    }
    if tokens.len() < seq_len || seq_len == 0 {
        return Err(DistillError::Invalid(format!(
            "{} calibration tokens are fewer than one sequence of {seq_len}",
            tokens.len()
        )));
    }
    if let Some(l) = (0..layers.start).find(|&l| finished(out_dir, l).is_none()) {
        return Err(DistillError::Invalid(format!(
            "layer range {layers:?} with student inputs needs layers 0..{} finished in {} (layer {l} is not)",
            layers.start,
            out_dir.display()
        )));
    }
    // Every layer already finished with this config: nothing to replay.
    let done: Option<Vec<LayerReport>> = layers
        .clone()
        .map(|l| finished(out_dir, l).filter(|r| r.config == *cfg))
        .collect();
    if let Some(reports) = done {
        tracing::info!("layers {layers:?} already finished");
        write_summary(out_dir, &reports)?;
        return Ok(reports);
    }
    let device = &model.device;
    let hidden = c.hidden_size;
    let windows = tokens.len() / seq_len;
    let n = windows * seq_len * hidden;
    let mut h_s = vec![0f32; n];
    for w in 0..windows {
        let ids = &tokens[w * seq_len..(w + 1) * seq_len];
        put(&mut h_s, w, model.embed(ids_tensor(ids, 1, device)));
    }
    let mut h_t = (corr > 0.0).then(|| h_s.clone());
    let (mut a_s, mut x, mut y) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut reports = Vec::new();
    for l in 0..layers.end {
        let layer = &model.layers[l];
        let done = finished(out_dir, l);
        let train = layers.contains(&l) && done.as_ref().is_none_or(|r| r.config != *cfg);
        if !train
            && let Some(r) = &done
            && r.config != *cfg
        {
            tracing::warn!(layer = l, "replaying a layer finished with another config");
        }
        let t = Instant::now();
        // The student's attention part; the target (dense FFN, corrected towards the teacher).
        for w in 0..windows {
            let (a, xs) = layer.attention_part(window(&h_s, w, seq_len, hidden, device), &model.rope, &mut None);
            if let Some(h_t) = h_t.as_mut() {
                let ht = window(h_t, w, seq_len, hidden, device);
                let (at, xt) = layer.attention_part(ht, &model.rope, &mut None);
                let next = layer.ffn_residual(at, layer.ffn.forward(xt).map_err(ffn_err(l))?);
                if train {
                    let yd = layer.ffn.forward(xs.clone()).map_err(ffn_err(l))?;
                    let want = (next.clone() - a.clone()).div_scalar(c.residual_multiplier);
                    put(&mut y, w, yd.clone() + (want - yd).mul_scalar(corr));
                }
                put(h_t, w, next);
            } else if train {
                put(&mut y, w, layer.ffn.forward(xs.clone()).map_err(ffn_err(l))?);
            }
            put(&mut a_s, w, a);
            put(&mut x, w, xs);
        }
        let block = if train {
            let ffn = HostFfn::from_checkpoint(ckpt, l).map_err(ModelError::from)?;
            let (block, mut report) = train_layer(l, &ffn, &x, &y, cfg, device, |s, total, loss| {
                progress(l, s, total, loss)
            })?;
            report.seconds = t.elapsed().as_secs_f64(); // inputs pass + training
            save_layer(out_dir, &block, &report)?;
            tracing::info!(
                layer = l,
                rel_error_init = report.val_rel_error_init,
                rel_error = report.val_rel_error,
                seconds = report.seconds,
                "layer finished (student inputs)"
            );
            reports.push(report);
            block
        } else {
            if let (true, Some(r)) = (layers.contains(&l), done) {
                tracing::info!(layer = l, "already finished, replaying");
                reports.push(r);
            }
            load_layer_block(out_dir, l, cfg.train_policy.clone(), device)?
        };
        if l + 1 == layers.end {
            break;
        }
        // The student's residual stream after this layer.
        for w in 0..windows {
            let f = FeedForward::forward(&block, window(&x, w, seq_len, hidden, device)).map_err(ffn_err(l))?;
            put(
                &mut h_s,
                w,
                layer.ffn_residual(window(&a_s, w, seq_len, hidden, device), f),
            );
        }
    }
    if teacher_top_k > 0 && layers.end == c.num_layers {
        match &h_t {
            Some(h_t) => {
                let used = &tokens[..windows * seq_len];
                let secs =
                    crate::teacher_topk::write_teacher_top_k(model, used, seq_len, teacher_top_k, out_dir, |w| {
                        window(h_t, w, seq_len, hidden, device)
                    })?;
                tracing::info!(
                    seconds = secs,
                    "the teacher's top {teacher_top_k} written for the polish"
                );
            }
            None => tracing::info!("residual_correction = 0 carries no teacher stream: the polish runs the teacher"),
        }
    }
    write_summary(out_dir, &reports)?;
    Ok(reports)
}
