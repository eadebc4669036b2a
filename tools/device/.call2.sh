export PYTHONPATH=packages/atom-core/src
ATOM_PDL=0 timeout 120 python3 tools/device/mla_decode_sweep.py --prefill --batch-sizes 128,32 > $OUT/prefill.log 2>&1; cat $OUT/prefill.log | tail -22
ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=200 ATOM_TEST_WORKERS=8 timeout 230 bash tools/device/run_gpu_tests.sh core -k "prefill or router or fused_experts or mla_decode_large or grouped_topk or tiny_model or deepseek" 2>&1 | tail -15
export PYTHONPATH=packages/atom-core/src:packages/atom-server/src:/tmp/site
ATOM_PDL=0 timeout 200 python3 tools/device/decode_profile.py --presets deepseek-v2-lite --batch-sizes 1,32,128 --kernels 128 --kernel-steps 0 --label new > $OUT/prof.log 2>&1; grep "^\[new\] .*bs=\|graph replay" $OUT/prof.log; grep -A28 "kernels, bs=128" $OUT/prof.log | cut -c1-60,100-175
