//! The calibration side of a [`DataSet`] as token ids, for threshold methods and the training
//! that runs under them: nothing here opens a held-out file.
//!
//! - `tails`: the last `tokens_per_file` tokens of each calibration file (English novels, then
//!   the Korean help text), what thresholds are calibrated and allocations probed on (as
//!   `ladimo sparsify` and stage 2 do: the tail, not the tokens training uses);
//! - `train`: the head of the files, `train_tokens` in all with the Korean share `ko_share`,
//!   English and Korean windows of `seq_len` spread evenly through each other, so that the tail a
//!   trainer holds back to measure is not one language only.

use crate::{DataSet, Part, Result, take_tokens};

#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationTokens {
    /// One entry per calibration file, in the order of the data set (English, then Korean).
    pub tails: Vec<Vec<u32>>,
    pub train: Vec<u32>,
}

/// See the module doc. `ko_share` in [0, 1).
pub fn calibration_tokens(
    tok: &ladimo_io::Tokenizer,
    data: &DataSet,
    tokens_per_file: usize,
    train_tokens: usize,
    ko_share: f64,
    seq_len: usize,
) -> Result<CalibrationTokens> {
    let mut files = data.calibration_en.clone();
    files.push(data.calibration_ko.clone());
    let tails = files
        .iter()
        .map(|f| take_tokens(tok, std::slice::from_ref(f), tokens_per_file, Part::Tail))
        .collect::<Result<Vec<_>>>()?;
    let ko_n = (train_tokens as f64 * ko_share.clamp(0.0, 1.0)).round() as usize;
    let en = take_tokens(tok, &data.calibration_en, train_tokens - ko_n, Part::Head)?;
    let ko = if ko_n > 0 {
        take_tokens(tok, std::slice::from_ref(&data.calibration_ko), ko_n, Part::Head)?
    } else {
        Vec::new()
    };
    Ok(CalibrationTokens {
        tails,
        train: interleave(&en, &ko, seq_len.max(1)),
    })
}

/// The windows of `en` and `ko` merged, the rarer spread evenly through the other (a Korean
/// window whenever Korean falls behind its share of the windows so far).
fn interleave(en: &[u32], ko: &[u32], seq_len: usize) -> Vec<u32> {
    let (en_w, ko_w): (Vec<&[u32]>, Vec<&[u32]>) = (en.chunks(seq_len).collect(), ko.chunks(seq_len).collect());
    let share = ko_w.len() as f64 / (en_w.len() + ko_w.len()).max(1) as f64;
    let (mut e, mut k) = (0, 0);
    let mut out = Vec::with_capacity(en.len() + ko.len());
    while e < en_w.len() || k < ko_w.len() {
        let take_ko = k < ko_w.len() && (e >= en_w.len() || (k as f64) < share * (e + k + 1) as f64);
        if take_ko {
            out.extend_from_slice(ko_w[k]);
            k += 1;
        } else {
            out.extend_from_slice(en_w[e]);
            e += 1;
        }
    }
    out
}
