//! Loading datasets: format detection, the shared real datasets, the bundled dataset, errors
//! (never panics), truncation, shuffling and held-out splits.

use std::path::{Path, PathBuf};

use ftrt_models::data::{
    load_dataset, read_records, DataError, DataOptions, DatasetFormat, Holdout, PromptRenderer,
    Record,
};

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/assets")
}

fn smollm2() -> PromptRenderer {
    PromptRenderer::from_dir(&assets().join("tokenizers/smollm2")).unwrap()
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Text of the labelled tokens of example `index`.
fn labelled_text(renderer: &PromptRenderer, ids: &[u32], labels: &[i32]) -> String {
    let kept: Vec<u32> = ids
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l != -100)
        .map(|(&id, _)| id)
        .collect();
    renderer.tokenizer().decode(&kept, false).unwrap()
}

#[test]
fn shared_messages_dataset_trains_only_on_assistant_answers() {
    let renderer = smollm2();
    let path = assets().join("data/messages_rg_2k.jsonl");
    let data = load_dataset(&path, None, &renderer, &DataOptions::default()).unwrap();
    assert_eq!(data.stats().format, DatasetFormat::Messages);
    assert_eq!(data.len(), 2000);
    let first = &data.examples()[0];
    assert_eq!(
        labelled_text(&renderer, &first.input_ids, &first.labels),
        "184<|im_end|>"
    );
    for (record, example) in data.records().iter().zip(data.examples()) {
        let answer = record.reference().unwrap();
        let text = labelled_text(&renderer, &example.input_ids, &example.labels);
        assert_eq!(text, format!("{answer}<|im_end|>"));
    }
}

#[test]
fn shared_alpaca_array_matches_the_messages_version() {
    let renderer = smollm2();
    let options = DataOptions::default();
    let alpaca = load_dataset(
        &assets().join("data/alpaca_rg_2k.json"),
        None,
        &renderer,
        &options,
    )
    .unwrap();
    let messages = load_dataset(
        &assets().join("data/messages_rg_2k.jsonl"),
        None,
        &renderer,
        &options,
    )
    .unwrap();
    assert_eq!(alpaca.stats().format, DatasetFormat::Alpaca);
    // The two files hold the same pairs; through the chat template they tokenize identically.
    assert_eq!(alpaca.examples(), messages.examples());
}

#[test]
fn bundled_dataset_is_disjoint_and_scorable() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let (format, train) = read_records(&root.join("data/train.jsonl"), None).unwrap();
    let (_, eval) = read_records(&root.join("data/eval.jsonl"), None).unwrap();
    assert_eq!(format, DatasetFormat::PromptCompletion);
    assert_eq!((train.len(), eval.len()), (388, 100));
    let prompt = |record: &Record| match record {
        Record::PromptCompletion { prompt, .. } => prompt.clone(),
        other => panic!("unexpected record {other:?}"),
    };
    let train_prompts: std::collections::HashSet<String> =
        train.iter().map(|(_, r)| prompt(r)).collect();
    assert!(eval
        .iter()
        .all(|(_, r)| !train_prompts.contains(&prompt(r))));
    for (_, record) in &eval {
        let answer = record.reference().unwrap();
        assert!(ftrt_models::data::accuracy::score(
            answer,
            &format!("The result is {answer}.")
        ));
    }
}

#[test]
fn explicit_format_and_question_answer_detection() {
    let dir = tempfile::tempdir().unwrap();
    let qa = write(
        &dir,
        "qa.jsonl",
        "{\"question\": \"Calculate 1 + 1.\", \"answer\": \"2\"}\n",
    );
    let renderer = smollm2();
    let data = load_dataset(&qa, None, &renderer, &DataOptions::default()).unwrap();
    assert_eq!(data.stats().format, DatasetFormat::PromptCompletion);
    let text = write(
        &dir,
        "text.jsonl",
        "{\"text\": \"Hello world\", \"instruction\": \"x\"}\n",
    );
    let data = load_dataset(
        &text,
        Some(DatasetFormat::Text),
        &renderer,
        &DataOptions::default(),
    )
    .unwrap();
    // "Hello world" -> [19556, 905] (assets README), then EOS <|im_end|> = 2; all labelled.
    assert_eq!(data.examples()[0].input_ids, vec![19556, 905, 2]);
    assert_eq!(data.examples()[0].labels, vec![19556, 905, 2]);
    assert_eq!(
        "prompt-completion".parse::<DatasetFormat>().unwrap(),
        DatasetFormat::PromptCompletion
    );
    assert!(matches!(
        "sharegpt".parse::<DatasetFormat>(),
        Err(DataError::FormatName { .. })
    ));
}

fn error_of(path: &Path) -> String {
    load_dataset(path, None, &smollm2(), &DataOptions::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_input_reports_where_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let bad_line = write(
        &dir,
        "bad.jsonl",
        "{\"text\": \"a\"}\n\n{\"text\": \"b\"\n{\"text\": \"c\"}\n",
    );
    let message = error_of(&bad_line);
    assert!(message.contains("bad.jsonl:3: invalid JSON"), "{message}");

    let not_object = write(&dir, "list.jsonl", "{\"text\": \"a\"}\n[1, 2]\n");
    assert!(error_of(&not_object).contains("list.jsonl:2: expected a JSON object, found an array"));

    let missing_field = write(
        &dir,
        "alpaca.json",
        "[\n {\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": \"c\"}\n]",
    );
    let message = error_of(&missing_field);
    assert!(
        message.contains("alpaca.json:3: missing field \"output\""),
        "{message}"
    );

    let empty = write(&dir, "empty.jsonl", "\n  \n");
    assert!(error_of(&empty).contains("empty.jsonl: the dataset is empty"));

    let missing = dir.path().join("nope.jsonl");
    let message = error_of(&missing);
    assert!(
        message.contains("nope.jsonl: cannot read the dataset: No such file"),
        "{message}"
    );

    let unknown = write(&dir, "odd.jsonl", "{\"foo\": 1, \"bar\": 2}\n");
    let message = error_of(&unknown);
    assert!(
        message.contains("odd.jsonl:1: unknown dataset format"),
        "{message}"
    );
    assert!(
        message.contains("keys [bar, foo]") && message.contains("supported: alpaca"),
        "{message}"
    );

    let renderer = PromptRenderer::new(smollm2().tokenizer().clone(), None, Some("<|im_end|>"));
    let chat = write(&dir, "chat.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n");
    let message = load_dataset(&chat, None, &renderer, &DataOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("chat.jsonl:1: a messages dataset needs a model with a chat template"),
        "{message}"
    );
}

#[test]
fn long_sequences_are_truncated_and_counted() {
    let renderer = smollm2();
    let options = DataOptions {
        max_seq_length: 40,
        use_chat_template: true,
    };
    let path = assets().join("data/messages_rg_2k.jsonl");
    let data = load_dataset(&path, None, &renderer, &options).unwrap();
    let stats = data.stats();
    assert!(stats.truncated > 0);
    // Cut at 40 tokens, the answers (after the long prompts) are gone: those rows are dropped.
    assert_eq!(stats.without_loss + data.len(), 2000);
    assert!(data
        .examples()
        .iter()
        .all(|e| e.input_ids.len() <= 40 && e.labels.len() == e.input_ids.len()));
}

#[test]
fn shuffle_and_split_are_deterministic_and_disjoint() {
    let renderer = smollm2();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = load_dataset(
        &root.join("data/eval.jsonl"),
        None,
        &renderer,
        &DataOptions::default(),
    )
    .unwrap();
    let a = data.shuffled(42);
    assert_eq!(a.examples(), data.shuffled(42).examples());
    assert_ne!(a.examples(), data.shuffled(43).examples());
    assert_ne!(a.examples(), data.examples());
    let mut sorted_a: Vec<_> = a.examples().to_vec();
    let mut sorted_data: Vec<_> = data.examples().to_vec();
    sorted_a.sort_by(|x, y| x.input_ids.cmp(&y.input_ids));
    sorted_data.sort_by(|x, y| x.input_ids.cmp(&y.input_ids));
    assert_eq!(sorted_a, sorted_data);

    let (train, held) = data.split(Holdout::Fraction(0.1));
    assert_eq!((train.len(), held.len()), (90, 10));
    let (train2, held2) = data.split(Holdout::Fraction(0.1));
    assert_eq!(
        (train.examples(), held.examples()),
        (train2.examples(), held2.examples())
    );
    assert!(held
        .examples()
        .iter()
        .all(|e| !train.examples().contains(e)));
    assert!(held.records().iter().all(|r| !train.records().contains(r)));
    let (train, held) = data.split(Holdout::Count(1000));
    assert_eq!((train.len(), held.len()), (1, 99));
}
