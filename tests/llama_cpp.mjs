// llama.cpp itself (through node-llama-cpp, installed under $MOE_LLAMA_CPP by
// scripts/llama_cpp.sh) on a GGUF file:
//   node llama_cpp.mjs FILE.gguf IDS [TEXT...]
// prints JSON: "probs", llama.cpp's next-token probabilities at every position of IDS (comma
// separated; key/value cache in F32, no flash attention, so that nothing is rounded to f16
// but what the file holds); "tokens", its ids of each TEXT with special tokens parsed, plus the
// start and end tokens its flags add. IDS "-" loads the vocabulary only.
import {pathToFileURL} from "node:url";

const lib = process.env.MOE_LLAMA_CPP + "/node_modules/node-llama-cpp/dist/index.js";
const {getLlama} = await import(pathToFileURL(lib).href);
const [file, ids, ...texts] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: file, vocabOnly: ids === "-"});
const out = {probs: [], tokens: {}};
if (ids !== "-") {
    const ctx = await model.createContext({contextSize: 64, batchSize: 64, flashAttention: false,
                                           experimentalKvCacheKeyType: "F32",
                                           experimentalKvCacheValueType: "F32"});
    const input = ids.split(",").map(t => [Number(t), {generateNext: {probabilities: true}}]);
    for (const r of await ctx.getSequence().controlledEvaluate(input)) {
        const p = new Array(model.tokens.nTokens ?? 0).fill(0);
        for (const [token, prob] of r.next.probabilities) p[token] = prob;
        out.probs.push(p);
    }
}
// llama.cpp's flags themselves (node-llama-cpp's shouldAppendEosToken is false without a start
// token)
const t = model.tokens, bos = t.bos != null && t._model.shouldPrependBosToken();
const eos = t.eos != null && t._model.shouldAppendEosToken();
for (const text of texts)
    out.tokens[text] = [...(bos ? [t.bos] : []), ...model.tokenize(text, true),
                        ...(eos ? [t.eos] : [])];
console.log(JSON.stringify(out));
await llama.dispose();
