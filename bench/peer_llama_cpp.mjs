// The CPU peer a user of GGUF files would pick: llama.cpp itself (node-llama-cpp, installed by
// scripts/llama_cpp.sh into $MOE_LLAMA_CPP), prefilling and decoding a GGUF file as
// `moe bench generate` does a model of the same shape:
//
//   python3 tests/hf_models.py DIR F32 1 1 32000 mixtral '{"hidden_size": 1024,
//       "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
//       "num_key_value_heads": 4, "num_local_experts": 8, "tie_word_embeddings": true,
//       "max_position_embeddings": 1024}'
//   moe convert --model DIR --to gguf M.gguf [--outtype q8_0]
//   MOE_LLAMA_CPP=DIR node bench/peer_llama_cpp.mjs M.gguf [--tokens 512]
//       [--max-new-tokens 64] [--threads 2] [--iters 3] [--kv f16|f32]
//
// A prompt of --tokens random ids in one call (prefill), then --max-new-tokens greedy tokens,
// one evaluation each with llama.cpp's key/value cache (--kv: its type, llama.cpp's default
// f16); best of --iters, each on a fresh sequence. Prints ms per prefilled and decoded token.
import {pathToFileURL} from "node:url";

const lib = process.env.MOE_LLAMA_CPP + "/node_modules/node-llama-cpp/dist/index.js";
const {getLlama} = await import(pathToFileURL(lib).href);
const args = process.argv.slice(2);
const opt = (name, def) => {
    const i = args.indexOf("--" + name);
    return i >= 0 ? args[i + 1] : def;
};
const file = args[0], P = Number(opt("tokens", 512)), N = Number(opt("max-new-tokens", 64));
const threads = Number(opt("threads", 2)), iters = Number(opt("iters", 3));
const kv = opt("kv", "f16").toUpperCase();
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: file});
const ctx = await model.createContext({contextSize: P + N + 16, batchSize: P, threads,
                                       experimentalKvCacheKeyType: kv,
                                       experimentalKvCacheValueType: kv});
const V = model.tokens.nTokens ?? 256;
let best = {prefill: Infinity, decode: Infinity};
for (let it = 0; it < iters; it++) {
    const seq = ctx.getSequence();
    // ids of the vocabulary's normal tokens (as the random prompt of moe bench generate)
    const prompt = Array.from({length: P},
                              () => 3 + Math.floor(Math.random() * Math.min(V - 3, 250)));
    let t0 = performance.now();
    await seq.evaluateWithoutGeneratingNewTokens(prompt.slice(0, P - 1));
    const prefill = (performance.now() - t0) / (P - 1);
    let n = 0;
    t0 = performance.now();
    let first = 0;
    for await (const token of seq.evaluate([prompt[P - 1]], {temperature: 0})) {
        if (n === 0) first = performance.now();
        if (++n > N) break;
    }
    // decoding: the N evaluations after the first (which finishes the prompt)
    const decode = (performance.now() - first) / N;
    best = {prefill: Math.min(best.prefill, prefill), decode: Math.min(best.decode, decode)};
    seq.dispose();
}
console.log(`llama.cpp (node-llama-cpp) ${file}: ${threads} threads, kv ${kv}, best of ${iters}: ` +
            `prefill ${(best.prefill).toFixed(3)} ms a token (${P - 1} tokens), ` +
            `decoding ${(best.decode).toFixed(2)} ms a token (${N} tokens)`);
await llama.dispose();
