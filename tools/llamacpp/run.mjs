// Runs a GGUF file in llama.cpp (node-llama-cpp's prebuilt CPU binaries; nothing is downloaded or compiled).
// Reads one JSON request on stdin, prints one JSON answer on stdout:
//   {"model": "m.gguf", "context": 512, "lora": "adapter.gguf" (optional, applied with scale 1),
//    "batch": 16 (optional: most tokens evaluated at once; default node-llama-cpp's, up to the context),
//    "tokenize": ["text", ...],                 -> "tokens": [[ids], ...]   (special tokens parsed, no BOS added)
//    "tokenize_plain": ["text", ...],           -> "tokens_plain": [[ids], ...] (special-token text kept as text)
//    "generate": [{"ids": [...], "max_tokens": 20}, ...]
//                                              -> "generated": [{"ids": [...], "text": "...", "stopped": bool}]
//                                                 greedy; stopped = ended on an end-of-generation token by itself;
//                                                 ms_first / ms_total: time to the first token / to the end
//    "chat": ["user message", ...]             -> "chat": [{"text": "...", "wrapper": "..."}]
//                                                 one-turn chats through node-llama-cpp's chat session, using
//                                                 the chat template stored in the file; greedy
//    "probs": [[ids], ...]}                     -> "probs": [[[[id, p], ...top 20] per position], ...]
//                                                 next-token distributions along a fixed sequence
//
// Pass a "batch" under 32 for models with 32-wide layers (phitune's tests do: their tiny models have hidden
// size 32). On CPUs with AMX (Sapphire Rapids and later) node-llama-cpp loads its sapphirerapids build, and
// there llama.cpp's AMX kernel for q4_0/q4_1/q8_0 weights with exactly 32 input features (ggml-cpu/amx/
// mmq.cpp, tinygemm_kernel_amx: for a full block of 32 tokens with a single 32-wide K block it adds the
// product to what the output buffer held instead of writing it) makes nonsense of every batch of 32 or
// more tokens. Batches under 32 never reach that branch: the tests' q8_0/q4_0 files then give bit for bit
// what the non-AMX builds give. Real models are wider and unaffected; elsewhere the batch size changed no
// bit (f32, f16, bf16, q8_0, q4_0 files; batch 16 against the default; AMX and non-AMX builds).
import {getLlama, JinjaTemplateChatWrapper, LlamaChatSession} from "node-llama-cpp";

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const req = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: req.model});
const out = {
    bos: model.tokens.bos, eos: model.tokens.eos, eot: model.tokens.eot,
    tokens: (req.tokenize ?? []).map((t) => Array.from(model.tokenize(t, true))),
    tokens_plain: (req.tokenize_plain ?? []).map((t) => Array.from(model.tokenize(t, false))),
    generated: [], probs: [],
};

if ((req.generate ?? []).length || (req.probs ?? []).length || (req.chat ?? []).length) {
    const context = await model.createContext({contextSize: req.context ?? 512, threads: req.threads ?? 1,
                                               ...(req.batch ? {batchSize: req.batch} : {}),
                                               ...(req.lora ? {lora: req.lora} : {})});
    const sequence = context.getSequence();
    for (const g of req.generate ?? []) {
        await sequence.clearHistory();
        const ids = [];
        let stopped = true;
        const began = performance.now();
        let first = null;
        for await (const token of sequence.evaluate(g.ids, {temperature: 0})) {
            first ??= performance.now() - began;
            if (ids.length >= (g.max_tokens ?? 20)) { stopped = false; break; }
            if (model.isSpecialToken(token) && [model.tokens.eos, model.tokens.eot].includes(token)) {
                ids.push(token);
                break;
            }
            ids.push(token);
        }
        out.generated.push({ids, text: model.detokenize(ids), stopped, ms_first: first,
                            ms_total: performance.now() - began});
    }
    for (const ids of req.probs ?? []) {
        await sequence.clearHistory();
        const input = ids.map((id) => [id, {generateNext: {probabilities: true}}]);
        const res = await sequence.controlledEvaluate(input);
        out.probs.push(res.map((r) => Array.from(r?.next?.probabilities?.entries() ?? []).slice(0, req.top ?? 20)));
    }
    out.chat = [];
    for (const message of req.chat ?? []) {
        await sequence.clearHistory();
        // The Jinja template stored in the file, as llama.cpp's own chat front ends render it.
        const chatWrapper = new JinjaTemplateChatWrapper({template: model.fileInfo.metadata.tokenizer.chat_template});
        const session = new LlamaChatSession({contextSequence: sequence, autoDisposeSequence: false, chatWrapper});
        session.setChatHistory([]);  // no system message of node-llama-cpp's own: the template decides
        const text = await session.prompt(message, {temperature: 0, maxTokens: req.max_tokens ?? 80});
        out.chat.push({text, wrapper: session.chatWrapper.wrapperName});
        session.dispose({disposeSequence: false});
    }
    await context.dispose();
}
await model.dispose();
process.stdout.write(JSON.stringify(out) + "\n");
