"""The words of what a run writes for people (the HTML report, the model card) in Chinese and English.

Messages are written in English in the code and looked up here for Chinese (`output.language: zh`, the
default). The review app uses babel catalogues; these files are written after every run, by the core install,
so a plain table keeps them free of the review extra. A message missing here shows in English (a test checks
that every message the report and the card use has its Chinese).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

LANGUAGES = ("zh", "en")
HTML_LANG = {"zh": "zh-CN", "en": "en"}

Translate = Callable[[str], str]


def translator(language: str) -> Translate:
    """`tr(message)`: the message in `language` (zh or en)."""
    table = ZH if language == "zh" else {}
    return lambda message: table.get(message, message)


def label(key: str, tr: Translate) -> str:
    """A summary or metrics key as a person reads it: its translation, else the key with spaces for underscores."""
    text = tr(key)
    return text if text != key else key.replace("_", " ")


def duration(started: str | None, finished: str | None) -> str:
    """`2 min 5 s` between two UTC times of a stage status (— when either is missing)."""
    try:
        seconds = round((_time(finished) - _time(started)).total_seconds())
    except (TypeError, ValueError):
        return "—"
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _time(text: str | None) -> datetime:
    if text is None:
        raise TypeError("no time")
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


ZH: dict[str, str] = {
    # page
    "Wenmai run report": "文脉运行报告",
    "Written by Wenmai. Self-contained: no scripts, no network.": "由文脉生成。本文件自成一体：不含脚本，不联网。",
    "This report is rewritten after every stage; reload it to see the latest.": "每个阶段结束后都会重写本报告；刷新页面即可看到最新进度。",
    "Run in progress": "运行中",
    "Run finished": "运行已结束",
    "Run stopped": "运行已停止",
    "Contents": "目录",
    # overview
    "Overview": "概况",
    "recipe": "配方",
    "created": "创建时间",
    "updated": "更新时间",
    "base model": "基座模型",
    "hub id": "模型库 ID",
    "model sha256": "模型 sha256",
    "git commit": "代码提交",
    "git commit at start": "开始时的代码提交",
    "wenmai": "文脉版本",
    "Stages": "阶段",
    "stage": "阶段",
    "kind": "类型",
    "state": "状态",
    "started": "开始",
    "finished": "结束",
    "duration": "用时",
    "attempts": "尝试次数",
    "done": "完成",
    "failed": "失败",
    "running": "运行中",
    "pending": "待运行",
    "gate passed": "门槛通过",
    "gate failed": "门槛未通过",
    "forced": "已强制继续",
    "warning": "警告",
    "error": "错误",
    # stage sections
    "Figures": "关键数字",
    "measure": "指标",
    "value": "数值",
    "Runtime and throughput": "运行时间与吞吐",
    "Curves": "曲线",
    "no metrics logged": "没有记录到指标",
    "last value": "最后一个值",
    "points": "点数",
    "step": "步",
    # recipe
    "Recipe and hyperparameters": "配方与超参数",
    "option": "选项",
    "The resolved recipe, as run (secrets show as their ${env:...} reference)": "运行时解析后的完整配方（密钥只显示 ${env:...} 引用）",
    "recipe.yaml is missing": "缺少 recipe.yaml",
    "Model and LoRA": "模型与 LoRA",
    # data cards
    "Data cards": "数据卡",
    "dataset": "数据集",
    "read by stages": "读取它的阶段",
    "file": "文件",
    "format": "格式",
    "records read": "读取记录数",
    "bad records": "坏记录数",
    "excluded by policy": "按政策排除",
    "kept": "保留记录数",
    "characters": "字符数",
    "languages": "语言",
    "licences": "许可",
    "sources": "来源",
    "sensitivity grades": "敏感等级",
    "topics": "主题",
    "personal data found": "发现的个人信息",
    "duplicates": "重复",
    "in the sensitive register": "登记为敏感",
    "none": "无",
    "Data policy": "数据政策",
    "intended_use": "预期用途",
    "max_sensitivity": "最高敏感等级",
    "allow_missing_rights": "允许缺少权利信息",
    "pii": "个人信息处理",
    "pii_types": "个人信息类型",
    "dedup": "去重",
    "grades": "等级",
    "topic_list": "敏感主题清单",
    "custom_licences": "自定义许可",
    # parity
    "Parity checks": "一致性检查",
    "comparison": "比较",
    "compared with": "对照",
    "max abs logit diff": "最大 logit 绝对差",
    "mean KL": "平均 KL",
    "top-1 agreement": "top-1 一致率",
    "greedy agreement": "贪心解码一致率",
    "tolerance": "容差",
    "result": "结果",
    "pass": "通过",
    "FAIL": "未通过",
    "probes": "探针数",
    # evaluation
    "Gates": "门槛",
    "passed": "通过",
    "failed — forced past it (--force)": "未通过——已用 --force 强制继续",
    "gate": "门槛",
    "requirement": "要求",
    "detail": "说明",
    "Multiple choice": "选择题",
    "subject": "科目",
    "questions": "题数",
    "accuracy [95% CI]": "准确率 [95% 置信区间]",
    "change": "变化",
    "Alignment suite": "对齐测试集",
    "rule pass rate (all rules)": "规则通过率（全部规则）",
    "mean": "均值",
    "rule": "规则",
    "largest bias score gap": "最大偏见分差",
    "largest bias reference gap": "最大偏见参考差",
    "No reward model was wired to this stage: reward scores were not measured.": "本阶段没有接入奖励模型：未测奖励分。",
    "Bias probes": "偏见探针",
    "Implicit-bias probes": "内隐偏见探针",
    "category": "类别",
    "probe kind": "探针类型",
    "association": "联想",
    "decision": "相对决策",
    "ambiguous": "模糊语境",
    "disambiguated": "明确语境",
    "association: IAT-style d (0: no association); decision: spread of the picks across groups (0 to 1); "
    "ambiguous / disambiguated: BBQ bias score (-1 to 1, 0: unbiased). 95% bootstrap interval in brackets.": (
        "联想：IAT 式效应量 d（0 表示没有关联）；相对决策：各群体被选中比例的差距（0 到 1）；"
        "模糊 / 明确语境：BBQ 偏见分数（-1 到 1，0 表示无偏）。方括号内为 95% 自助法区间。"
    ),
    "probe": "探针",
    "axis": "维度",
    "groups": "群体",
    "gap (score / reference)": "差距（分数 / 参考）",
    "Replies, before and after": "训练前后的回答",
    "first": "前",
    "prompt": "提示",
    "(empty reply)": "（空回答）",
    # rounds
    "Rounds": "轮次",
    "round": "轮次",
    "run": "运行",
    "data added": "新增数据",
    "exported": "已导出",
    "wall time": "用时",
    "yes": "是",
    "no": "否",
    # lineage
    "Lineage": "来源记录（lineage）",
    "lineage.json is missing": "缺少 lineage.json",
    "Model": "模型",
    "Data files": "数据文件",
    "path": "路径",
    "bytes": "字节",
    "changed": "变更",
    "changed during the run (the stages still to run read the new file)": "运行中发生变更（之后的阶段读取新文件）",
    "Stages: what came from where": "阶段：输入从哪里来",
    "inputs": "输入",
    "outputs": "输出",
    "used": "实际使用",
    "Packages": "软件包",
    "package": "软件包",
    "version": "版本",
    "at start": "开始时",
    "now": "现在",
    "The code or packages changed while this run was resumed: see the columns 'at start' and 'now'.": "续跑时代码或软件包发生了变化：请对照“开始时”和“现在”两列。",
    # summary keys
    "first_loss": "首步损失",
    "last_loss": "末步损失",
    "eval_loss_before": "训练前验证损失",
    "eval_loss_after": "训练后验证损失",
    "steps": "步数",
    "train_runtime_s": "训练用时（秒）",
    "train_examples": "训练样本数",
    "eval_examples": "验证样本数",
    "eval_sequences": "验证序列数",
    "trainable_parameters": "可训练参数",
    "total_parameters": "总参数",
    "train_examples_per_s": "每秒训练样本",
    "eval_accuracy": "验证准确率",
    "evaluated": "被评估的模型",
    "rule_pass_rate": "规则通过率",
    "parity_passed": "一致性检查通过",
    "merge_s": "合并用时（秒）",
    "export_s": "导出用时（秒）",
    "formats": "格式",
    "adapter_stage": "适配器来自阶段",
    "merge_dtype": "合并精度",
    "memory_needed_gib": "所需内存（GiB）",
    "records": "记录数",
    "sequences": "序列数",
    "tokens": "词元数",
    "learned_tokens": "参与学习的词元",
    "truncated": "被截断",
    "pairs": "偏好对",
    "dimensions": "维度",
    "loss": "损失",
    "learning_rate": "学习率",
    "grad_norm": "梯度范数",
    "epoch": "轮数（epoch）",
    "data": "训练数据",
    "train_data": "训练数据",
    "skipped_bad_records": "跳过的坏记录",
    "excluded_by_policy": "按政策排除",
    "duplicates_removed": "去掉的重复",
    "pii_masked": "遮蔽了个人信息的记录",
    "dropped_no_learned_tokens": "无可学习词元而丢弃",
    "ties_dropped": "去掉的平局",
    "rater_agreement": "评分员一致性",
    "responses_rated_twice": "被评两次的回答",
    "exact": "完全一致",
    "within_one": "相差不超过 1 分",
    "mean_abs_diff": "平均绝对差",
    "same_order": "排序一致",
    "train_pairs": "训练偏好对",
    "eval_pairs": "验证偏好对",
    "eval_accuracy_before": "训练前验证准确率",
    "eval_accuracy_after": "训练后验证准确率",
    "reward_first": "首步奖励",
    "reward_last": "末步奖励",
    "weighted_reward_first": "首步加权奖励",
    "weighted_reward_last": "末步加权奖励",
    "kl_last": "末步 KL",
    "completion_length_last": "末步回答长度",
    "reward_functions": "奖励函数权重",
    "prompts": "提示",
    "too_long_left_out": "过长而略去",
    "reward_margin_first": "首步奖励差",
    "reward_margin_last": "末步奖励差",
    "reward_accuracy_first": "首步偏好准确率",
    "reward_accuracy_last": "末步偏好准确率",
    "eval_reward_margin": "验证奖励差",
    "eval_reward_accuracy": "验证偏好准确率",
    "left_out_prompt_fills_seq_len": "提示占满序列长度而略去",
    "duplicate_pairs": "重复的偏好对",
    "contradictory_pairs": "相互矛盾的偏好对",
    "loss_type": "损失类型",
    "total": "合计",
    "merged_max_abs_logit_diff": "合并后最大 logit 绝对差",
    "merged_greedy_agreement": "合并后贪心解码一致率",
    "reloaded_max_abs_logit_diff": "重新加载后最大 logit 绝对差",
    # model card
    "This model generates text with artificial intelligence; its outputs are AI-generated content. Label its outputs as AI-generated wherever they are shown or published. `wenmai chat --label` adds a machine-readable (implicit) label to each generation, in the spirit of {standard}.": "本模型用人工智能生成文本，其输出属于人工智能生成内容。凡展示或发布其输出之处，都须标明由人工智能生成。`wenmai chat --label` 会给每次生成附上机器可读的（隐式）标识，参照 {standard}。",
    "Base model": "基座模型",
    "from the file {file}": "来自文件 {file}",
    "changed {time}: sha256 {sha}": "{time} 有变更：sha256 {sha}",
    "Fine-tuned with Wenmai {version}: run {run} (recipe {recipe}); the adapter of stage {stage} merged into the base": "用文脉 {version} 微调：运行 {run}（配方 {recipe}），阶段 {stage} 的适配器已合并进基座",
    "Chat template: the one training used (sha256 {sha}); generation stops at token ids {ids}": "对话模板：与训练时相同（sha256 {sha}）；生成在词元 ID {ids} 处停止",
    "License: {licence}": "许可：{licence}",
    " (from the base model; check the licences of your data too)": "（沿用基座模型的许可；也请核对训练数据的许可）",
    "Data": "数据",
    "{format} records from {file} (sha256 {sha})": "{format} 格式的记录，来自 {file}（sha256 {sha}）",
    "Data card of stage {stage}: {links}": "阶段 {stage} 的数据卡：{links}",
    "No data card was recorded for this run; check each dataset's licence and rights before publishing.": "本次运行没有数据卡；发布前请逐一核对各数据集的许可和权利。",
    "Evaluation": "评估",
    "No evaluation stage ran in this run; evaluate before relying on the model.": "本次运行没有评估阶段；在依赖本模型之前请先评估。",
    "GGUF files": "GGUF 文件",
    # federated training
    "Federated training": "联邦训练",
    "clients": "参与方",
    "examples": "样本数",
    "train loss": "训练损失",
    "held-out loss": "留出集损失",
    "Held-out loss on each client's split": "各参与方留出集上的损失",
    "client's split": "参与方的留出集",
    (
        "In transformers, take the weights from a GGUF and the tokenizer (chat template, EOS) from this folder: "
        "`AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME)` and `AutoTokenizer.from_pretrained(folder)` "
        "(with `gguf_file=` here it loses both; a GGUF alone in a folder carries them). transformers reads no rope "
        "scaling from a GGUF: add `config=AutoConfig.from_pretrained(folder)` when config.json has one."
    ): (
        "在 transformers 中使用时，权重取自 GGUF 文件，分词器（对话模板、EOS）取自本文件夹："
        "`AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME)` 与 `AutoTokenizer.from_pretrained(folder)`"
        "（若在本文件夹用 `gguf_file=` 加载分词器，两者都会丢失；单独放在一个文件夹中的 GGUF 则自带两者）。"
        "transformers 不从 GGUF 读取 RoPE 缩放：config.json 中有缩放设置时，请加上 "
        "`config=AutoConfig.from_pretrained(folder)`。"
    ),
    "Run it with llama.cpp or Ollama": "用 llama.cpp 或 Ollama 运行",
    "llama.cpp (the GGUF carries the chat template and stop tokens training used):": (
        "llama.cpp（GGUF 文件自带训练时使用的对话模板和停止词）："
    ),
    "Ollama (`Modelfile` here: FROM `{first}`, the chat template in Ollama's form, the same stop tokens):": (
        "Ollama（本文件夹中的 `Modelfile`：FROM `{first}`，对话模板已转换为 Ollama 的格式，停止词相同）："
    ),
    "Intended use": "预期用途",
    "How to use": "使用方法",
    "Provenance": "来源标识",
    "Cultural question answering and writing assistance in the domain of the training data. Not evaluated for medical, legal or financial advice, nor for facts outside that domain; outputs can be wrong and must be reviewed by a person before publication.": "用于训练数据所在领域的文化问答与写作辅助。未就医疗、法律、金融建议以及该领域以外的事实做过评估；输出可能有误，发布前必须经人工审核。",
    "or": "或者",
    "add `--label` for labelled JSON output": "加 `--label` 可输出带标识的 JSON",
    "{kept} records kept of {read}; licences {licences}; sources {sources}; sensitivity {grades}; personal data found {pii} ({action})": "读取 {read} 条，保留 {kept} 条；许可 {licences}；来源 {sources}；敏感等级 {grades}；发现的个人信息 {pii}（{action}）",
    "data policy: intended use {use}": "数据政策：预期用途 {use}",
    "none recorded": "无记录",
    "unknown": "未知",
    "loss (first → last)": "损失（首步 → 末步）",
    "held-out loss (before → after)": "验证损失（训练前 → 训练后）",
    "Training software": "训练软件",
    "accuracy (%)": "准确率（%）",
    "sensitivity": "敏感等级",
}
