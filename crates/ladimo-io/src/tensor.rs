//! A backend-free tensor: a shape (PyTorch order) and f32 values.

use std::fmt;

/// How a tensor is stored in the checkpoint file (before conversion to f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
        };
        f.write_str(s)
    }
}

/// A dense f32 tensor on the host, row-major, shape in PyTorch order (`[out, in]` for linear weights).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "HostTensor shape {shape:?} does not match {} values",
            data.len()
        );
        Self { shape, data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Write `tensors` (f32, PyTorch layout) as one safetensors file, atomically (`atomic::write_atomic_via`).
pub fn write_safetensors(
    path: &std::path::Path,
    tensors: &std::collections::BTreeMap<String, HostTensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> crate::Result<()> {
    let bytes: Vec<(&String, Vec<u8>, &HostTensor)> = tensors
        .iter()
        .map(|(k, t)| (k, t.data.iter().flat_map(|v| v.to_le_bytes()).collect(), t))
        .collect();
    let views = bytes
        .iter()
        .map(|(k, b, t)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b).map(|v| (k.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| crate::Error::format(path, e.to_string()))?;
    crate::atomic::write_atomic_via(path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp).map_err(|e| crate::Error::format(path, e.to_string()))
    })
}

/// The tensors of a safetensors file written by [`write_safetensors`] (f32 only), by name, and its
/// metadata. Every error names `path`.
pub fn read_safetensors(
    path: &std::path::Path,
) -> crate::Result<(
    std::collections::BTreeMap<String, HostTensor>,
    std::collections::HashMap<String, String>,
)> {
    let bytes = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| crate::Error::format(path, e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| crate::Error::format(path, e.to_string()))?;
    let mut tensors = std::collections::BTreeMap::new();
    for (name, t) in st.tensors() {
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(crate::Error::format(
                path,
                format!("{name}: {:?}, expected F32", t.dtype()),
            ));
        }
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        tensors.insert(name, HostTensor::new(t.shape().to_vec(), v));
    }
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}
