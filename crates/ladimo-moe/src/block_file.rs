//! One MoE block in a file of its own (`*.moe.safetensors`): what stage 1 keeps per layer between
//! layers, runs and the polish. The tensors are those of one layer of an MoE checkpoint
//! ([`crate::checkpoint`]), under the same Mixtral names below `block_sparse_moe` (without the
//! `model.layers.N.` in front), and the file's metadata holds the combine rule
//! (`ladimo.combine`, JSON). Unlike a checkpoint, the combine scale is kept in the metadata rather
//! than folded into the down projections, so a block read back is the block that was written,
//! bit for bit. The routing policy is not stored: the reader gives it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::Device;
use ladimo_io::HostTensor;

use crate::checkpoint::{CheckpointError, build_block, put_block, take_block, unscaled_host_weights};
use crate::{Combine, MoeBlock, Policy};

/// The tensors' prefix in a block file: a checkpoint layer's block without the layer's path.
const PREFIX: &str = "block_sparse_moe";
const COMBINE_KEY: &str = "ladimo.combine";

/// Write `block` (its weights and combine rule) to `path`, through a temporary name.
pub fn save_block(path: &Path, block: &MoeBlock) -> Result<(), CheckpointError> {
    let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
    put_block(&mut tensors, PREFIX, unscaled_host_weights(block));
    // One metadata entry only: safetensors writes the metadata map in its (random) iteration
    // order, and a block file must be the same bytes every time it is written (resumed runs are
    // checked against uninterrupted ones byte for byte).
    let meta = HashMap::from([(
        COMBINE_KEY.to_string(),
        serde_json::to_string(&block.combine).expect("a combine rule serialises"),
    )]);
    ladimo_io::write_safetensors(path, &tensors, Some(meta))?;
    Ok(())
}

/// Read the block [`save_block`] wrote to `path`, routed by `policy` (validated against its
/// experts), on `device`.
pub fn load_block(path: &Path, policy: Policy, device: &Device) -> Result<MoeBlock, CheckpointError> {
    let (tensors, meta) = ladimo_io::read_safetensors(path)?;
    let format = |msg: String| CheckpointError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let combine: Combine = meta
        .get(COMBINE_KEY)
        .ok_or_else(|| format(format!("no `{COMBINE_KEY}` in the metadata: not an MoE block file")))
        .and_then(|c| serde_json::from_str(c).map_err(|e| format(format!("`{COMBINE_KEY}`: {e}"))))?;
    let weights = take_block(
        PREFIX,
        |n| tensors.contains_key(n),
        |n| {
            tensors
                .get(n)
                .cloned()
                .ok_or_else(|| format(format!("no tensor `{n}`")))
        },
    )?;
    build_block(weights, combine, policy, device).map_err(|e| format(e.to_string()))
}
