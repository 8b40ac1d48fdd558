//! Host-side hidden-state streams (`[tokens, hidden]` f32) and the tensors cut from them: shared
//! by the layer-wise trainers ([`train`](crate::train), [`sequential`](crate::sequential),
//! [`thresholded`](crate::thresholded)).

use burn::tensor::{Device, Tensor, TensorData};
use ladimo_model::ModelError;
use ladimo_model::util::to_vec;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::DistillError;

/// Rows `idx` of a `[tokens, hidden]` host matrix, as a device tensor.
pub(crate) fn rows(data: &[f32], hidden: usize, idx: &[usize], device: &Device) -> Tensor<2> {
    let mut v = Vec::with_capacity(idx.len() * hidden);
    for &i in idx {
        v.extend_from_slice(&data[i * hidden..(i + 1) * hidden]);
    }
    Tensor::from_data(TensorData::new(v, [idx.len(), hidden]), device)
}

/// Window `w` of a host `[tokens, hidden]` stream, as a `[1, seq_len, hidden]` tensor.
pub(crate) fn window(data: &[f32], w: usize, seq_len: usize, hidden: usize, device: &Device) -> Tensor<3> {
    let n = seq_len * hidden;
    Tensor::from_data(
        TensorData::new(data[w * n..(w + 1) * n].to_vec(), [1, seq_len, hidden]),
        device,
    )
}

/// Write `t` (one window) over window `w` of a host stream.
pub(crate) fn put(data: &mut [f32], w: usize, t: Tensor<3>) {
    let v = to_vec(t);
    data[w * v.len()..(w + 1) * v.len()].copy_from_slice(&v);
}

/// An FFN's error in layer `layer`, as ours.
pub(crate) fn ffn_err(layer: usize) -> impl Fn(ladimo_model::FfnError) -> DistillError {
    move |source| ModelError::Ffn { layer, source }.into()
}

/// The batches of one layer's training, in order: in every epoch the `train_n` training tokens
/// shuffled (the generator seeded by `seed` and the layer) and cut into whole batches of `batch`.
pub(crate) fn batch_schedule(train_n: usize, batch: usize, epochs: usize, seed: u64, layer: usize) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed ^ (layer as u64).wrapping_mul(0x9E37_79B9));
    let mut order: Vec<usize> = (0..train_n).collect();
    let mut schedule = Vec::new();
    for _ in 0..epochs {
        order.shuffle(&mut rng);
        schedule.extend(order.chunks_exact(batch).map(<[usize]>::to_vec));
    }
    schedule
}
