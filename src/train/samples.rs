//! Held-out answers before and after training, scored with `data::accuracy::score`.

use ftrt_models::data::accuracy::score;
use ftrt_models::data::{Dataset, PromptRenderer};
use ftrt_models::lora::LoraWeights;
use ftrt_models::train::LoraModel;

/// Tokens generated per answer.
const MAX_NEW_TOKENS: usize = 32;

/// Generates answers to the first `n` held-out questions, prints them, and returns the number
/// answered correctly and the number asked.
pub fn answer_and_score(
    label: &str,
    model: &mut dyn LoraModel,
    lora: &LoraWeights,
    eval: &Dataset,
    renderer: &PromptRenderer,
    eos: &[u32],
    n: usize,
) -> Result<(usize, usize), String> {
    let mut right = 0;
    let mut asked = 0;
    println!("--- held-out answers {label} ---");
    for record in eval.records().iter().take(n) {
        let Some(expected) = record.reference() else {
            continue;
        };
        let prompt = renderer.prompt_ids(record, true)?;
        let ids = model.generate(&prompt, lora, MAX_NEW_TOKENS, eos)?;
        let text = renderer
            .tokenizer()
            .decode(&ids, true)
            .map_err(|e| format!("tokenizer: {e}"))?;
        let ok = score(expected, &text);
        right += ok as usize;
        asked += 1;
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
