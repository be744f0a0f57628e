"""SAM 3 research snippets (transformers 5.25.0, torch 2.14.1, CPU, random weights, offline).
Run: HF_HUB_OFFLINE=1 venv/bin/python snippets.py
Needs: transformers, torch, torchvision, and open_clip_torch (only for its bundled bpe_simple_vocab_16e6.txt.gz).
"""
import gzip, hashlib, importlib.util, os, time
import numpy as np, torch
from transformers import (CLIPTokenizer, Sam2VideoVideoProcessor, Sam3Config, Sam3DETRDecoderConfig, Sam3DETREncoderConfig,
    Sam3GeometryEncoderConfig, Sam3ImageProcessor, Sam3MaskDecoderConfig, Sam3TrackerVideoConfig, Sam3VideoConfig,
    Sam3VideoModel, Sam3VideoProcessor, Sam3ViTConfig, Sam3VisionConfig)
from transformers.models.sam3_video import modeling_sam3_video as MV

MV.cv_utils_kernel = False  # else the first forward tries to fetch "kernels-community/cv-utils" from the Hub
                            # (NMS / hole filling are then skipped -- same as what the library does offline on CPU)

# ---------------------------------------------------------------- tokenizer, offline
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, map(chr, cs)))

def open_clip_bpe_path():
    spec = importlib.util.find_spec("open_clip")  # locate without importing (open_clip imports timm)
    return os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")

def clip_tokenizer_offline(bpe_path=None):
    """CLIPTokenizer identical to open_clip's SimpleTokenizer ids (49408 tokens), built without the Hub."""
    merges = gzip.open(bpe_path or open_clip_bpe_path()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=32)

# ---------------------------------------------------------------- tiny random Sam3VideoModel
def tiny_config(image_size=112, patch=14, d=128):
    """~2.1M-param SAM3 video config. Constraints found: d (fpn/tracker hidden) must be > 64 and a multiple of 64
    (memory_encoder_output_channels is fixed at 64 via a hard-coded kv_in_dim=64; hidden == 64 crashes in
    _prepare_memory_conditioned_features); low_res_mask_size = 4*image_size/patch; rope feat sizes = image_size/patch."""
    g = image_size // patch
    feat = [[4 * g, 4 * g], [2 * g, 2 * g], [g, g]]
    vit = Sam3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=image_size, patch_size=patch, window_size=4, global_attn_indexes=[1],
                        pretrain_image_size=image_size)
    det = Sam3Config(
        vision_config=Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=d, backbone_feature_sizes=feat),
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, hidden_act="gelu"),
        geometry_encoder_config=Sam3GeometryEncoderConfig(hidden_size=d, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=Sam3DETREncoderConfig(hidden_size=d, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=Sam3DETRDecoderConfig(hidden_size=d, num_layers=1, num_queries=8, num_attention_heads=2, intermediate_size=64),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=d, num_attention_heads=2))
    trk = Sam3TrackerVideoConfig(
        vision_config=dict(backbone_config=vit.to_dict(), fpn_hidden_size=d, backbone_feature_sizes=feat),
        prompt_encoder_config=dict(hidden_size=d, image_size=image_size, patch_size=patch),
        mask_decoder_config=dict(hidden_size=d, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=d),
        memory_attention_hidden_size=d, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[g, g], memory_encoder_hidden_size=d, memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=d, memory_fuser_embed_dim=d, memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1,
        image_size=image_size)
    return Sam3VideoConfig(detector_config=det, tracker_config=trk, low_res_mask_size=4 * g)

def build_tiny_model(seed=0, image_size=112):
    torch.manual_seed(seed)
    m = Sam3VideoModel(tiny_config(image_size)).eval()
    with torch.no_grad():  # make random weights produce non-degenerate output
        m.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(5.0)  # tracker: "object present"
        m.detector_model.detr_decoder.presence_head.layer3.bias.fill_(5.0)         # detector presence ~ 1
    m.score_threshold_detection = m.new_det_thresh = 0.5  # random logits give probs ~0.50-0.52
    m.max_num_objects = 6
    return m

def make_processor(size=112):
    g4 = 4 * size // 14
    return Sam3VideoProcessor(
        image_processor=Sam3ImageProcessor(size={"height": size, "width": size}, mask_size={"height": g4, "width": g4},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3),
        video_processor=Sam2VideoVideoProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=clip_tokenizer_offline(), target_size=size)

def disc_video(n=10, hw=128, r=14):
    yy, xx = np.mgrid[:hw, :hw]
    out = np.zeros((n, hw, hw, 3), np.uint8)
    for t in range(n):
        out[t][(xx - 25 - 8 * t) ** 2 + (yy - 40 - 4 * t) ** 2 <= r * r] = 255
    return out

# ---------------------------------------------------------------- bounded-memory session
class BoundedSession(MV.Sam3VideoInferenceSession):
    """num_frames = frames seen (or the known total of a file), not len(processed_frames), so old frames can go.
    (The tracker reads num_frames: min(num_frames, 16) normalises object-pointer time encodings, and pointers
    with ref_frame_idx >= num_frames are skipped -- pruning the plain session silently changes the masks.)"""
    _seen = 0
    @property
    def num_frames(self):
        return self._seen
    def add_new_frame(self, pixel_values, frame_idx=None):
        frame_idx = self._seen if frame_idx is None else frame_idx
        self._seen = max(self._seen, frame_idx + 1)
        return super().add_new_frame(pixel_values, frame_idx)

def prune(sess, i, keep=16):
    """Drop state never read again (keep = max(num_maskmem, max_object_pointers_in_encoder) = 16).
    cond_frame_outputs are NOT pruned: HF uses object pointers of *all* past conditioning frames (one more per
    object every recondition_every_nth_frame=16 frames) -- the one remaining unbounded growth."""
    for k in [k for k in sess.processed_frames if k < i]: del sess.processed_frames[k]
    for d in sess.output_dict_per_obj.values():
        for k in [k for k in d["non_cond_frame_outputs"] if k <= i - keep]: del d["non_cond_frame_outputs"][k]
    for k in [k for k in sess.obj_id_to_tracker_score_frame_wise if k < i]: del sess.obj_id_to_tracker_score_frame_wise[k]
    for k in [k for k in sess.suppressed_obj_ids if k < i]: del sess.suppressed_obj_ids[k]

# ---------------------------------------------------------------- inference modes
def run_whole(model, proc, video, texts):
    """Library reference: whole-video session + propagate_in_video_iterator (hotstart on, 15-frame delay)."""
    sess = proc.init_video_session(video=video, inference_device="cpu")
    proc.add_text_prompt(sess, texts)
    return {mo.frame_idx: proc.postprocess_outputs(sess, mo) for mo in model.propagate_in_video_iterator(inference_session=sess)}

def run_streaming(model, proc, frames, texts, bounded=True):
    """Library streaming: init_video_session() without video, then model(frame=...) per frame.
    NB: streaming=True disables hotstart removal -> objects are never dropped; no output delay."""
    sess = proc.init_video_session(inference_device="cpu")
    if bounded: sess.__class__ = BoundedSession
    proc.add_text_prompt(sess, texts)
    outs = {}
    for i, fr in enumerate(frames):
        inp = proc(images=fr, return_tensors="pt")
        mo = model(inference_session=sess, frame=inp.pixel_values[0], frame_idx=i)
        outs[i] = proc.postprocess_outputs(sess, mo, original_sizes=inp.original_sizes)
        if bounded: prune(sess, i)
    return outs

def run_frame_by_frame_like_whole(model, proc, frames, texts, total_frames=None):
    """Frame-by-frame, bounded memory, bit-identical to run_whole when total_frames is the real count
    (file); for live use total_frames=None (-> 10**9, equals run_whole of any video >= 16 frames)."""
    sess = proc.init_video_session(inference_device="cpu"); sess.__class__ = BoundedSession
    sess._seen = total_frames or 10 ** 9
    proc.add_text_prompt(sess, texts)
    outs, buf, n = {}, [], len(frames)
    for i, fr in enumerate(frames):
        pv = proc.video_processor(videos=fr[None], return_tensors="pt")  # same resize path as whole mode
        sess.video_height, sess.video_width = pv.original_sizes[0]
        sess.add_new_frame(pv.pixel_values_videos[0][0], i)
        mo = model(inference_session=sess, frame_idx=i)  # frame=None -> streaming=False -> hotstart heuristics on
        prune(sess, i)
        buf.append(mo); sess.hotstart_removed_obj_ids.update(mo.removed_obj_ids)
        ready = buf if i == n - 1 else (buf[:1] if len(buf) >= model.hotstart_delay else [])
        for r in ready:
            outs[r.frame_idx] = proc.postprocess_outputs(sess, r)
        buf = buf[len(ready):]
    return outs

def digest(outs):
    h = hashlib.sha256()
    for f in sorted(outs):
        h.update(repr(outs[f]["object_ids"].tolist()).encode()); h.update(outs[f]["masks"].numpy().tobytes())
        h.update(outs[f]["scores"].numpy().tobytes())
    return h.hexdigest()[:16]

# ---------------------------------------------------------------- re-id embeddings available per object
def object_embeddings(sess, mo, frame_idx):
    """obj_id -> {'pointer': SAM object pointer (hidden,), 'pooled': mask-pooled tracker-neck feature (hidden,)}"""
    feats = sess.cache.get_vision_features(frame_idx)["vision_feats"][-1]  # (g*g, 1, C), cache holds the current frame
    g = int(feats.shape[0] ** 0.5); fmap = feats[:, 0].T.reshape(-1, g, g)
    res = {}
    for obj_id in mo.object_ids:
        od = sess.output_dict_per_obj[sess.obj_id_to_idx(obj_id)]
        out = od["non_cond_frame_outputs"].get(frame_idx) or od["cond_frame_outputs"].get(frame_idx)
        w = torch.nn.functional.interpolate((mo.obj_id_to_mask[obj_id] > 0).float()[None], size=(g, g), mode="area")[0, 0]
        res[obj_id] = {"pointer": out["object_pointer"].reshape(-1),
                       "pooled": (fmap * w).sum((1, 2)) / w.sum().clamp(min=1e-6)}
    return res

if __name__ == "__main__":
    torch.set_num_threads(2)
    proc, video = make_processor(), disc_video(20)
    model = build_tiny_model()
    texts = ["white disc", "ball"]
    W = run_whole(model, proc, video, texts)
    t = time.perf_counter(); S = run_streaming(model, proc, video, texts); ts = (time.perf_counter() - t) / len(video)
    S2 = run_streaming(build_tiny_model(), proc, video, texts, bounded=False)
    P = run_frame_by_frame_like_whole(model, proc, video, texts, total_frames=len(video))
    print("whole", digest(W), "| streaming bounded", digest(S), "unbounded", digest(S2), "| frame-by-frame-like-whole", digest(P))
    print("streaming %.3f s/frame; frame 0 ids %s scores %s masks %s; prompt_to_obj_ids %s" % (
        ts, S[0]["object_ids"].tolist(), [round(x, 3) for x in S[0]["scores"].tolist()], tuple(S[0]["masks"].shape), S[0]["prompt_to_obj_ids"]))
    print("whole frame 19 ids", W[19]["object_ids"].tolist(), "| streaming frame 19 ids", S[19]["object_ids"].tolist())
