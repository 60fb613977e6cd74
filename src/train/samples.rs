//! Held-out answers before and after training, scored with `data::accuracy::score`.

use ftrt_models::data::accuracy::score;
use ftrt_models::data::{Dataset, PromptRenderer};
use ftrt_models::lora::LoraWeights;
use ftrt_models::train::LoraModel;

/// Tokens generated per answer.
const MAX_NEW_TOKENS: usize = 32;

/// Generates answers to the first `n` held-out questions (greedy, all in one batch), prints
/// them, and returns the number answered correctly and the number asked.
pub fn answer_and_score(
    label: &str,
    model: &mut dyn LoraModel,
    lora: &LoraWeights,
    eval: &Dataset,
    renderer: &PromptRenderer,
    eos: &[u32],
    n: usize,
) -> Result<(usize, usize), String> {
    println!("--- held-out answers {label} ---");
    // Every question with a reference answer, generated together in one batch.
    let mut asked_records = Vec::new();
    let mut prompts = Vec::new();
    for record in eval.records().iter().take(n) {
        if let Some(expected) = record.reference() {
            prompts.push(renderer.prompt_ids(record, true)?);
            asked_records.push((record, expected));
        }
    }
    let answers = model.generate(&prompts, lora, MAX_NEW_TOKENS, eos)?;
    let mut right = 0;
    let asked = asked_records.len();
    for ((record, expected), ids) in asked_records.into_iter().zip(&answers) {
        let text = renderer
            .tokenizer()
            .decode(ids, true)
            .map_err(|e| format!("tokenizer: {e}"))?;
        let ok = score(expected, &text);
        right += ok as usize;
        let question = match record {
            ftrt_models::data::Record::PromptCompletion { prompt, .. } => prompt.clone(),
            other => format!("{other:?}").chars().take(80).collect(),
        };
        println!(
            "[{}] {question}  expected {expected}  got {:?}",
            if ok { "ok" } else { "  " },
            text.trim()
        );
    }
    if asked > 0 {
        println!(
            "accuracy {label}: {right}/{asked} = {:.1}%",
            100.0 * right as f64 / asked as f64
        );
    }
    Ok((right, asked))
}
