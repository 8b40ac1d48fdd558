//! Zero-shot scoring (continuation log-likelihoods) against Hugging Face transformers on the same
//! SmolLM2 weights: `tests/fixtures/eval_reference.json` (scripts/eval_reference.py) holds, per
//! task, the log-likelihood of every choice of the first items.

use ladimo_data::Task;
use ladimo_model::loglik::continuation_logliks;
use ladimo_tests::{fixture, smol};

#[test]
fn choice_logliks_match_transformers() {
    let s = smol();
    let tok = s.ckpt.tokenizer().unwrap();
    ladimo_data::fetch_tasks().expect("fetch the task files");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("eval_reference.json")).unwrap()).unwrap();
    let mut worst: f64 = 0.0;
    let mut checked = 0;
    for task in Task::ALL {
        let detail = reference["tasks"][task.name()]["items_detail"].as_array().unwrap();
        let items = ladimo_data::load_task(task, Some(6)).unwrap();
        for (item, want) in items.iter().zip(detail) {
            assert_eq!(item.id, want["id"].as_str().unwrap(), "{task}: item order");
            assert_eq!(item.gold as u64, want["gold"].as_u64().unwrap());
            let ctx = tok.encode(&item.context).unwrap();
            let conts: Vec<Vec<u32>> = item.choices.iter().map(|c| tok.encode(c).unwrap()).collect();
            let got = continuation_logliks(&s.model, &ctx, &conts).unwrap();
            for (i, (g, w)) in got.iter().zip(want["ll"].as_array().unwrap()).enumerate() {
                let w = w.as_f64().unwrap();
                assert_eq!(
                    conts[i].len() as u64,
                    want["ntok"][i].as_u64().unwrap(),
                    "{task} {}",
                    item.id
                );
                let d = (g - w).abs();
                worst = worst.max(d);
                assert!(
                    d < 5e-3,
                    "{task} item {} choice {i}: ours {g}, transformers {w}",
                    item.id
                );
                checked += 1;
            }
        }
    }
    println!("{checked} choices: max |ll diff| vs transformers {worst:.2e}");
}

#[test]
fn empty_context_or_continuation_is_an_error() {
    let s = smol();
    assert!(continuation_logliks(&s.model, &[], &[vec![1]]).is_err());
    let err = continuation_logliks(&s.model, &[1, 2], &[vec![3], vec![]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("continuation 1 is empty"), "{err}");
}
