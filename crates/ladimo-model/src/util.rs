//! Moving data between host vectors and burn tensors.

use burn::tensor::{Device, Int, Tensor, TensorData};
use ladimo_io::HostTensor;

/// A host tensor on `device` as a burn tensor of rank `D`.
pub fn to_tensor<const D: usize>(t: HostTensor, device: &Device) -> Tensor<D> {
    assert_eq!(t.shape.len(), D, "expected rank {D}, got shape {:?}", t.shape);
    Tensor::from_data(TensorData::new(t.data, t.shape), device)
}

/// A `[rows, cols]` host matrix transposed to `[cols, rows]` (PyTorch `[out, in]` -> burn `[in, out]`).
pub fn transpose_host(t: &HostTensor) -> HostTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut out = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = t.data[i * c + j];
        }
    }
    HostTensor::new(vec![c, r], out)
}

/// Token ids `[batch, seq]` as an Int tensor.
pub fn ids_tensor(ids: &[u32], batch: usize, device: &Device) -> Tensor<2, Int> {
    let seq = ids.len() / batch;
    let v: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, [batch, seq]), device)
}

/// All values of a float tensor, as f32, on the host.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
}
