//! The forward graph ([`ftrt_models::llama::graph`]) on the runtime's CPU executor, against
//! transformers' goldens (prefill and step-by-step decoding through the graph's KV cache) and
//! against the CPU model (a LoRA adapter merged into the graph's weights; the bf16 graph).

mod llama_common;

use ftrt_models::llama::gpu::init_adapter;
use ftrt_models::llama::graph::{sampling_words, write_step, ForwardGraph, Phase, StepRow};
use ftrt_models::llama::{LlamaModel, LoraAdapter, Proj, Rounding};
use ftrt_runtime::{plan, CpuExecutor, DType, PlanOptions};
use half::bf16;
use llama_common::{model, prompts, rel_err, Golden, TOL};

/// Runs steps of one graph on the CPU executor.
struct CpuForward<'g> {
    fg: &'g ForwardGraph,
    ex: CpuExecutor<'g>,
}

impl<'g> CpuForward<'g> {
    fn new(
        fg: &'g ForwardGraph,
        p: &'g ftrt_runtime::Plan,
        m: &LlamaModel,
        lora: Option<&LoraAdapter>,
    ) -> Self {
        let mut ex = CpuExecutor::new(&fg.graph, p);
        fg.for_each_weight(m, lora, |t, v| match fg.dtype {
            DType::BF16 => {
                let b: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
                ex.write(t, &b)
            }
            _ => ex.write(t, v),
        })
        .unwrap();
        Self { fg, ex }
    }

    /// Logits (picks.len(), V) of one step of `phase` on `rows`: of the rows `picks`.
    fn step(&mut self, phase: &Phase, rows: &[StepRow], picks: &[usize]) -> Vec<f32> {
        write_step(
            self.fg,
            &mut self.ex,
            phase,
            rows,
            picks,
            sampling_words(0.0, 0),
        )
        .unwrap();
        self.ex.run_nodes(phase.nodes.clone()).unwrap();
        let all: Vec<f32> = self.ex.read(phase.logits).unwrap();
        all[..picks.len() * self.fg.vocab].to_vec()
    }

    /// Logits (rows.len(), V) of every row of one prefill step: the step run once per group
    /// of logit rows (storing the same keys and values again).
    fn prefill(&mut self, rows: &[StepRow]) -> Vec<f32> {
        let fg = self.fg;
        let all: Vec<usize> = (0..rows.len()).collect();
        all.chunks(fg.prefill.logit_rows)
            .flat_map(|picks| self.step(&fg.prefill, rows, picks))
            .collect()
    }

    /// Logits (rows.len(), V) of one decoding step.
    fn decode(&mut self, rows: &[StepRow]) -> Vec<f32> {
        let fg = self.fg;
        let all: Vec<usize> = (0..rows.len()).collect();
        self.step(&fg.decode, rows, &all)
    }
}

/// The rows of a prefill of `prompts` into slots 0.. (packed in one step).
fn prefill_rows(prompts: &[Vec<u32>]) -> (Vec<StepRow>, Vec<usize>) {
    let mut rows = Vec::new();
    let mut last = Vec::new();
    for (s, p) in prompts.iter().enumerate() {
        for (i, &token) in p.iter().enumerate() {
            rows.push(StepRow {
                token,
                slot: s,
                pos: i,
            });
        }
        last.push(rows.len() - 1);
    }
    (rows, last)
}

fn row_of(logits: &[f32], v: usize, r: usize) -> &[f32] {
    &logits[r * v..(r + 1) * v]
}

#[test]
fn graph_prefill_and_decode_match_transformers() {
    // Mistral's sliding window (4 tokens) is not in the graph's cache attention: it refuses
    for arch in ["llama", "qwen2", "qwen3"] {
        let m = model(arch, Rounding::F32);
        let g = Golden::open(arch);
        let ps = prompts();
        let v = m.dims.vocab;
        let fg = ForwardGraph::new(&m, 16, ps.len(), 32, DType::F32).unwrap();
        let p = plan(&fg.graph, &PlanOptions::default()).unwrap();
        let mut run = CpuForward::new(&fg, &p, &m, None);
        // prefill of all prompts in one step: every row's logits against its own prompt's
        let (rows, last) = prefill_rows(&ps);
        let logits = run.prefill(&rows);
        for (i, pr) in ps.iter().enumerate() {
            let want = g.f(&format!("logits.{i}"));
            let first = last[i] + 1 - pr.len();
            let got: Vec<f32> = (first..=last[i])
                .flat_map(|r| row_of(&logits, v, r).to_vec())
                .collect();
            let e = rel_err(&got, &want);
            eprintln!("{arch} prompt {i}: graph prefill rel err {e:.2e}");
            assert!(e < TOL, "{arch} prompt {i}: rel err {e:e}");
        }
        // decoding transformers' greedy tokens one step at a time, one row per sequence
        let (toks, dec) = g.decode_goldens(ps.len());
        let mut logits: Vec<f32> = last
            .iter()
            .flat_map(|&r| row_of(&logits, v, r).to_vec())
            .collect();
        let mut lens: Vec<usize> = ps.iter().map(Vec::len).collect();
        for s in 0..toks[0].len() {
            for (i, d) in dec.iter().enumerate() {
                let e = rel_err(row_of(&logits, v, i), &d[s * v..(s + 1) * v]);
                assert!(e < TOL, "{arch} seq {i} step {s}: rel err {e:e}");
            }
            let rows: Vec<StepRow> = (0..ps.len())
                .map(|i| StepRow {
                    token: toks[i][s] as u32,
                    slot: i,
                    pos: lens[i],
                })
                .collect();
            logits = run.decode(&rows);
            lens.iter_mut().for_each(|l| *l += 1);
        }
    }
}

#[test]
fn graph_refuses_what_it_cannot_run() {
    let m = model("mistral", Rounding::F32);
    assert!(ForwardGraph::new(&m, 4, 1, 64, DType::F32).is_err()); // past the sliding window
    assert!(ForwardGraph::new(&m, 4, 1, 4, DType::F32).is_ok());
    let m = model("llama", Rounding::F32);
    assert!(ForwardGraph::new(&m, 4, 1, 8, DType::F16).is_err());
    assert!(ForwardGraph::new(&m, 0, 1, 8, DType::F32).is_err());
    let fg = ForwardGraph::new(&m, 2, 1, 8, DType::F32).unwrap();
    let row = |slot, pos| StepRow {
        token: 1,
        slot,
        pos,
    };
    let pf = &fg.prefill;
    assert!(fg.step_inputs(pf, &[row(0, 0); 3]).is_err()); // more rows than the phase's
    assert!(fg.step_inputs(&fg.decode, &[row(0, 0); 2]).is_err()); // one per slot
    assert!(fg.step_inputs(pf, &[row(1, 0)]).is_err()); // no such slot
    assert!(fg.step_inputs(pf, &[row(0, 8)]).is_err()); // past the capacity
    let (ids, pos, slot, len) = fg.step_inputs(pf, &[row(0, 3)]).unwrap();
    assert_eq!(
        (ids, pos, slot, len),
        (vec![1, 0], vec![3, 0], vec![0, 1], vec![4, 1])
    );
}

#[test]
fn graph_with_a_merged_adapter_and_in_bf16_matches_the_cpu_model() {
    let ps = prompts();
    for (rt, dtype, tol) in [
        (Rounding::F32, DType::F32, 1e-5),
        (Rounding::BF16, DType::BF16, 3e-2),
    ] {
        let m = model("qwen2", rt);
        let ad = init_adapter(&m.dims, 4, 8.0, &Proj::ALL, 7, 0.05);
        let fg = ForwardGraph::new(&m, 16, ps.len(), 32, dtype).unwrap();
        let p = plan(&fg.graph, &PlanOptions::default()).unwrap();
        let mut run = CpuForward::new(&fg, &p, &m, Some(&ad));
        let (rows, last) = prefill_rows(&ps);
        let got = run.step(&fg.prefill, &rows, &last);
        let mut cache = m.new_cache(ps.len());
        let slots: Vec<usize> = (0..ps.len()).collect();
        let want = m.prefill(&mut cache, &slots, &ps, Some(&ad)).unwrap();
        let e = rel_err(&got, &want);
        eprintln!("{dtype} graph with a merged adapter vs the CPU model: rel err {e:.2e}");
        assert!(e < tol, "{dtype}: rel err {e:e}");
        // and one decoding step
        let next: Vec<u32> = (0..ps.len()).map(|i| (7 * i + 3) as u32).collect();
        let rows: Vec<StepRow> = (0..ps.len())
            .map(|i| StepRow {
                token: next[i],
                slot: i,
                pos: ps[i].len(),
            })
            .collect();
        let got = run.decode(&rows);
        let want = m.decode(&mut cache, &slots, &next, Some(&ad)).unwrap();
        let e = rel_err(&got, &want);
        assert!(e < tol, "{dtype} decode: rel err {e:e}");
    }
}

#[test]
fn graph_generation_equals_the_cpu_models() {
    // several prompts decoding together through ftrt generate --graph's loop, greedy, with
    // prompts longer than a step's rows (fed over several steps)
    use ftrt_models::llama::graph::GraphSteps;
    use ftrt_models::llama::{generate_with, SamplingParams};
    for arch in ["llama", "qwen3"] {
        let m = model(arch, Rounding::F32);
        let ps = prompts();
        let fg = ForwardGraph::new(&m, 4, ps.len(), 24, DType::F32).unwrap();
        let p = plan(&fg.graph, &PlanOptions::default()).unwrap();
        let mut ex = CpuExecutor::new(&fg.graph, &p);
        fg.for_each_weight(&m, None, |t, v| ex.write(t, v)).unwrap();
        let mut steps = GraphSteps::new(&fg, ex);
        // greedy: the graph's own device-side picks; sampled: the sampler over its logits
        let sampled = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 20,
            seed: 5,
        };
        for params in [SamplingParams::default(), sampled] {
            let got = generate_with(&mut steps, &ps, 8, &[], params).unwrap();
            let want = m.generate(&ps, 8, &[], params, None).unwrap();
            assert_eq!(got, want, "{arch} {params:?}");
            // a second generation reuses the slots from position 0
            let again = generate_with(&mut steps, &ps, 8, &[], params).unwrap();
            assert_eq!(again, want, "{arch} {params:?}, second run");
        }
    }
}

#[test]
fn graph_draws_at_a_temperature_on_the_device_as_gumbel_max_over_the_cpu_models_logits() {
    // T = 0.7 without top-k / top-p: the graph's sample node draws (Gumbel-max under a seed
    // the sampler hands out per step); the reference redraws from the CPU model's logits of
    // the same tokens with the same seeds (one per step: a single prefill step here)
    use ftrt_models::llama::graph::GraphSteps;
    use ftrt_models::llama::{generate_with, Sampler, SamplingParams};
    use ftrt_ops::decode::sample_rows_cpu;
    let m = model("qwen3", Rounding::F32);
    let ps = prompts();
    let v = m.dims.vocab;
    let total: usize = ps.iter().map(Vec::len).sum();
    let fg = ForwardGraph::new(&m, total, ps.len(), 24, DType::F32).unwrap();
    let p = plan(&fg.graph, &PlanOptions::default()).unwrap();
    let mut ex = CpuExecutor::new(&fg.graph, &p);
    fg.for_each_weight(&m, None, |t, v| ex.write(t, v)).unwrap();
    let mut steps = GraphSteps::new(&fg, ex);
    let seed = ftrt_ops::dsl::gradcheck::Rng::fresh("graph_temperature").seed;
    let params = SamplingParams {
        temperature: 0.7,
        top_p: 1.0,
        top_k: 0,
        seed,
    };
    let new = 8;
    let got = generate_with(&mut steps, &ps, new, &[], params).unwrap();

    let mut sampler = Sampler::new(params);
    let mut cache = m.new_cache(ps.len());
    let slots: Vec<usize> = (0..ps.len()).collect();
    let logits = m.prefill(&mut cache, &slots, &ps, None).unwrap();
    let mut want = vec![Vec::new(); ps.len()];
    let mut picked = sample_rows_cpu(&logits, v, 1.0 / 0.7, sampler.draw_seed());
    for _ in 1..new {
        picked
            .iter()
            .zip(&mut want)
            .for_each(|(&t, w)| w.push(t as u32));
        let toks: Vec<u32> = picked.iter().map(|&t| t as u32).collect();
        let logits = m.decode(&mut cache, &slots, &toks, None).unwrap();
        picked = sample_rows_cpu(&logits, v, 1.0 / 0.7, sampler.draw_seed());
    }
    picked
        .iter()
        .zip(&mut want)
        .for_each(|(&t, w)| w.push(t as u32));
    assert_eq!(got, want, "seed {seed}");
    // not greedy: some draw differs from the top-1 continuation
    let greedy = generate_with(&mut steps, &ps, new, &[], SamplingParams::default()).unwrap();
    assert_ne!(got, greedy, "seed {seed}");
}

#[test]
fn graph_flash_prefill_of_whole_prompts_matches_the_cpu_model() {
    // head dims with flash kernels get a third phase: whole prompts attend within the step
    use ftrt_models::llama::generate_with;
    use ftrt_models::llama::gpu::random_init::random_llama;
    use ftrt_models::llama::graph::GraphSteps;
    use ftrt_models::llama::SamplingParams;
    let ps = prompts();
    for hd in [64, 128] {
        let m = random_llama(hd, 5, Rounding::F32);
        let fg = ForwardGraph::new(&m, 32, ps.len(), 40, DType::F32).unwrap();
        let fresh = fg
            .prefill_fresh
            .as_ref()
            .expect("a flash prefill phase at d 64 / 128");
        let p = plan(&fg.graph, &PlanOptions::default()).unwrap();
        let mut run = CpuForward::new(&fg, &p, &m, None);
        let (rows, last) = prefill_rows(&ps);
        let got = run.step(fresh, &rows, &last);
        let mut cache = m.new_cache(ps.len());
        let slots: Vec<usize> = (0..ps.len()).collect();
        let want = m.prefill(&mut cache, &slots, &ps, None).unwrap();
        let e = rel_err(&got, &want);
        eprintln!("d {hd}: flash prefill vs the CPU model: rel err {e:.2e}");
        assert!(e < 1e-5, "d {hd}: rel err {e:e}");
        // a prompt run that does not start at position 0 is refused by the flash phase
        let mut late = rows.clone();
        late[0].pos = 1;
        assert!(write_step(
            &fg,
            &mut run.ex,
            fresh,
            &late,
            &last,
            sampling_words(0.0, 0)
        )
        .is_err());

        // generation: prompts packed whole into flash steps (prefill rows 32), or cut across
        // steps of 4 rows (the cut runs go through the cache phase)
        for prefill_rows in [32, 4] {
            let fg = ForwardGraph::new(&m, prefill_rows, ps.len(), 40, DType::F32).unwrap();
            let p = plan(&fg.graph, &PlanOptions::default()).unwrap();
            let mut ex = CpuExecutor::new(&fg.graph, &p);
            fg.for_each_weight(&m, None, |t, v| ex.write(t, v)).unwrap();
            let mut steps = GraphSteps::new(&fg, ex);
            let params = SamplingParams::default();
            let got = generate_with(&mut steps, &ps, 6, &[], params).unwrap();
            let want = m.generate(&ps, 6, &[], params, None).unwrap();
            assert_eq!(got, want, "d {hd}, prefill rows {prefill_rows}");
        }
    }
}
