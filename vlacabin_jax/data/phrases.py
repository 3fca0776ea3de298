"""Chinese and English text of the synthetic cabin world: utterances, explanations, captions.

Every string the generator can produce is built from the tables here, which is what lets
`tools/build_tokenizer.py` guarantee that the packaged tokenizer never needs `<unk>`.
"""

from __future__ import annotations

import numpy as np

LANGUAGES = ("zh", "en")

SEAT = {
    "en": {"driver": "driver's seat", "passenger": "passenger seat", "rear_left": "rear left seat",
           "rear_right": "rear right seat"},
    "zh": {"driver": "主驾", "passenger": "副驾", "rear_left": "左后座", "rear_right": "右后座"},
}
WINDOW = {
    "en": {"driver": "driver's", "passenger": "passenger", "rear_left": "rear left", "rear_right": "rear right"},
    "zh": {"driver": "主驾", "passenger": "副驾", "rear_left": "左后", "rear_right": "右后"},
}
COLOR = {
    "en": {"warm": "warm", "white": "white", "blue": "blue", "purple": "purple", "green": "green", "red": "red"},
    "zh": {"warm": "暖色", "white": "白色", "blue": "蓝色", "purple": "紫色", "green": "绿色", "red": "红色"},
}
SCENT = {
    "en": {"citrus": "citrus", "forest": "forest", "ocean": "ocean", "lavender": "lavender"},
    "zh": {"citrus": "柑橘", "forest": "森林", "ocean": "海洋", "lavender": "薰衣草"},
}
DEST = {
    "en": {"home": "home", "office": "to the office", "charger": "to a charging station"},
    "zh": {"home": "家", "office": "公司", "charger": "充电站"},
}
SCREEN = {"en": {"driver": "the centre screen", "rear": "the rear screen"},
          "zh": {"driver": "中控屏", "rear": "后排屏"}}
SCENE = {
    "en": {"cinema": "Cinema mode", "meeting": "Meeting mode", "nap": "Nap mode", "welcome": "Welcome mode",
           "purify": "Purify mode", "relax": "Relax mode", "ventilate": "Ventilation", "defog": "Defog"},
    "zh": {"cinema": "影院模式", "meeting": "会议模式", "nap": "小憩模式", "welcome": "迎宾模式",
           "purify": "净化模式", "relax": "放松模式", "ventilate": "通风模式", "defog": "除雾模式"},
}
LIGHT = {"en": {"dark": "soft light for the dark cabin", "bright": "bright ambient light"},
         "zh": {"dark": "车内较暗，灯光柔和", "bright": "灯光明亮"}}
SLOT_TABLES = {"seat": SEAT, "win": WINDOW, "color": COLOR, "scent": SCENT, "dest": DEST,
               "screen": SCREEN, "scene": SCENE, "light": LIGHT}

# Utterances per request type; "<type>+<slot>" variants are used when that slot is spoken.
UTTERANCES: dict[str, dict[str, tuple[str, ...]]] = {
    "cinema": {"en": ("Cinema mode please", "Let's watch a movie", "Switch to cinema mode", "Movie time",
                      "I want the cinema experience"),
               "zh": ("打开影院模式", "我想看电影", "切换到影院模式", "来个观影模式", "看场电影吧")},
    "meeting": {"en": ("Start the meeting", "I have a call now, meeting mode", "Switch to meeting mode",
                       "Set up for my video meeting"),
                "zh": ("开始会议", "我要开会了", "切换到会议模式", "准备一下视频会议")},
    "nap": {"en": ("I want to take a nap", "Nap mode", "Let me rest for a while", "I need a short sleep"),
            "zh": ("我想睡一会儿", "打开小憩模式", "让我休息一下", "我要午睡")},
    "welcome": {"en": ("Welcome mode", "We just got in, get the car ready", "Get the cabin ready for us",
                       "Hello car, we are here"),
                "zh": ("迎宾模式", "我们上车了，准备一下", "把车内准备好", "你好，我们上车了")},
    "purify": {"en": ("Purify the air", "The air smells bad", "Clean the air in here", "Air purification mode"),
               "zh": ("净化空气", "车里空气不好", "打开净化模式", "帮我清新一下空气")},
    "relax": {"en": ("Help me relax", "Relax mode", "Calm things down in here", "Make it cozy and calm"),
              "zh": ("帮我放松一下", "打开放松模式", "让车里安静舒缓一点", "营造一个放松的氛围")},
    "ventilate": {"en": ("It's stuffy in here", "Let some fresh air in", "Ventilate the cabin", "Fresh air please"),
                  "zh": ("车里好闷", "换点新鲜空气", "通风一下", "打开通风模式")},
    "defog": {"en": ("The windshield is fogging up", "Defog the windows", "I can't see through the windshield",
                     "Clear the fog"),
              "zh": ("前挡风起雾了", "除雾", "玻璃上全是雾", "打开除雾模式")},
    "colder": {"en": ("A bit colder", "It's too warm", "I'm hot", "Cool it down a little", "Make it cooler"),
               "zh": ("冷一点", "有点热", "太热了", "温度调低一点", "凉快一点")},
    "colder+delta": {"en": ("Much colder please", "It's way too hot in here"),
                     "zh": ("调低两度", "太热了，再凉快很多")},
    "warmer": {"en": ("A bit warmer", "I'm cold", "It's chilly", "Warm it up a little", "Make it warmer"),
               "zh": ("暖和一点", "有点冷", "好冷啊", "温度调高一点", "热一点")},
    "warmer+delta": {"en": ("Much warmer please", "I'm freezing"), "zh": ("调高两度", "冻死了，暖和很多")},
    "set_temp": {"en": ("Set the temperature to {temp}", "{temp} degrees please", "Make it {temp} degrees"),
                 "zh": ("温度调到{temp}度", "设置{temp}度", "空调调到{temp}度")},
    "fan_up": {"en": ("More air", "Turn the fan up", "Stronger airflow"), "zh": ("风大一点", "风量调大", "加大风量")},
    "fan_down": {"en": ("Less air", "Turn the fan down", "The fan is too loud"),
                 "zh": ("风小一点", "风量调小", "风太大了")},
    "seat_heat": {"en": ("Heat my seat", "Turn on the seat heating", "My seat is cold"),
                  "zh": ("打开座椅加热", "座椅加热", "座椅有点凉")},
    "seat_heat+seat": {"en": ("Heat the {seat}", "Turn on heating for the {seat}"),
                       "zh": ("打开{seat}座椅加热", "给{seat}加热")},
    "seat_vent": {"en": ("Ventilate my seat", "Turn on the seat cooling", "My back is sweaty"),
                  "zh": ("打开座椅通风", "座椅通风", "后背出汗了")},
    "seat_vent+seat": {"en": ("Turn on ventilation for the {seat}", "Cool the {seat}"),
                       "zh": ("打开{seat}座椅通风", "给{seat}通风")},
    "massage": {"en": ("Give me a massage", "Turn on the massage", "My back hurts"),
                "zh": ("打开按摩", "来个按摩", "腰有点酸")},
    "massage+seat": {"en": ("Massage for the {seat}", "Turn on massage on the {seat}"),
                     "zh": ("打开{seat}按摩", "给{seat}按摩")},
    "volume_up": {"en": ("Turn the music up", "Louder please", "Volume up", "I can't hear the music"),
                  "zh": ("音量大一点", "声音调大", "大声一点", "听不清音乐")},
    "volume_down": {"en": ("Turn it down", "Too loud", "Volume down", "Lower the music"),
                    "zh": ("音量小一点", "声音调小", "太吵了", "小声一点")},
    "play_music": {"en": ("Play some music", "Put on some music", "I want to hear music"),
                   "zh": ("放点音乐", "来点音乐", "我想听歌")},
    "pause_media": {"en": ("Pause the music", "Stop the music", "Pause"), "zh": ("暂停音乐", "停止播放", "暂停一下")},
    "play_video": {"en": ("Play a video", "Put on a cartoon for the kids", "Play a show on the screen"),
                   "zh": ("播放视频", "给孩子放个动画片", "在屏幕上放个节目")},
    "open_window": {"en": ("Open the window a little", "Crack the window", "Open my window a bit"),
                    "zh": ("把窗户开一点", "开一点窗", "车窗开条缝")},
    "open_window+seat": {"en": ("Open the {win} window a little", "Crack the {win} window"),
                         "zh": ("把{win}车窗开一点", "{win}车窗开条缝")},
    "close_windows": {"en": ("Close all windows", "Close the windows", "Shut the windows"),
                      "zh": ("关闭所有车窗", "关窗", "把窗户都关上")},
    "sunshade_open": {"en": ("Open the sunshade", "Let some light in", "Open the roof shade"),
                      "zh": ("打开遮阳帘", "让光线进来", "打开天窗遮阳帘")},
    "sunshade_close": {"en": ("Close the sunshade", "The sun is too bright", "Close the roof shade"),
                       "zh": ("关闭遮阳帘", "太阳太晒了", "关上天窗遮阳帘")},
    "too_dark": {"en": ("It's too dark in here", "I can't see anything", "More light please"),
                 "zh": ("车里太暗了", "我看不清", "亮一点")},
    "ambient_color": {"en": ("Make the ambient light {color}", "Change the lights to {color}",
                             "{color} ambient lighting please"),
                      "zh": ("氛围灯换成{color}", "把灯光调成{color}", "我想要{color}的氛围灯")},
    "fragrance_on": {"en": ("Turn on the fragrance", "Make it smell nice", "I'd like some fragrance"),
                     "zh": ("打开香氛", "来点香味", "车里香一点")},
    "fragrance_on+scent": {"en": ("Turn on the {scent} fragrance", "{scent} scent please"),
                           "zh": ("打开{scent}香氛", "来点{scent}味道")},
    "navigate": {"en": ("Take me {dest}", "Navigate {dest}", "Let's go {dest}"),
                 "zh": ("导航到{dest}", "带我去{dest}", "我要去{dest}")},
    "child_asleep": {"en": ("The child fell asleep", "The baby is sleeping", "My kid just fell asleep"),
                     "zh": ("孩子睡着了", "宝宝睡了", "小朋友睡着了")},
    "long_day": {"en": ("What a day", "Finally done with work", "Today was so long"),
                 "zh": ("今天真累", "终于下班了", "这一天好漫长")},
    "stop_meeting": {"en": ("End the meeting", "The meeting is over", "Hang up the call"),
                     "zh": ("结束会议", "会开完了", "挂断会议")},
    "chitchat": {"en": ("How are you", "Tell me a joke", "What's your name", "Nice weather today", "Thank you",
                        "Never mind", "Who made you", "I like this car"),
                 "zh": ("你好吗", "讲个笑话", "你叫什么名字", "今天天气不错", "谢谢", "算了", "谁创造了你",
                        "我喜欢这辆车")},
    "more": {"en": ("A bit more", "More", "Even more", "Again"), "zh": ("再多一点", "再来一点", "还要", "再调一下")},
    "turn_off": {"en": ("Turn it off", "Switch it off", "Stop that"), "zh": ("关掉", "把它关了", "停掉吧")},
    "same_passenger": {"en": ("Same for the passenger", "Do the same for the passenger seat", "The passenger too"),
                       "zh": ("副驾也一样", "副驾也要", "给副驾也来一个")},
    "undo": {"en": ("Cancel that", "Undo", "Put it back"), "zh": ("取消", "撤销刚才的操作", "恢复原样")},
}

EXPLANATIONS: dict[str, dict[str, str]] = {
    "temp_down": {"en": "Set to {temp} degrees, a bit cooler.", "zh": "温度调到{temp}度，凉快一点。"},
    "temp_down_fan": {"en": "The cabin is warm: {temp} degrees and more fan.", "zh": "车内偏热，调到{temp}度并加大风量。"},
    "temp_down_quiet": {"en": "Cooled to {temp} degrees; the fan stays quiet for the sleeper.",
                        "zh": "降到{temp}度，乘客在睡觉，风量不变。"},
    "temp_up": {"en": "Set to {temp} degrees, a bit warmer.", "zh": "温度调到{temp}度，暖和一点。"},
    "temp_up_seat": {"en": "The cabin is cold: {temp} degrees and seat heating on.",
                     "zh": "车内很冷，调到{temp}度并打开座椅加热。"},
    "temp_limit": {"en": "The temperature is already at its limit.", "zh": "温度已到极限。"},
    "temp_set": {"en": "Temperature set to {temp} degrees.", "zh": "温度已设为{temp}度。"},
    "already": {"en": "That is already set.", "zh": "已经是这个设置了。"},
    "fan_set": {"en": "Fan set to level {level}.", "zh": "风量调到{level}档。"},
    "seat_heat_on": {"en": "Seat heating on for the {seat}.", "zh": "{seat}座椅加热已打开。"},
    "seat_heat_child": {"en": "Only gentle heat for the child seat.", "zh": "儿童座椅只开低档加热。"},
    "seat_vent_on": {"en": "Seat ventilation on for the {seat}.", "zh": "{seat}座椅通风已打开。"},
    "massage_on": {"en": "Massage on for the {seat}.", "zh": "{seat}按摩已打开。"},
    "child_seat_no": {"en": "No massage on a child seat.", "zh": "儿童座椅不能按摩。"},
    "sleeping_keep_volume": {"en": "A passenger is asleep, so the volume stays down.",
                             "zh": "有乘客在睡觉，音量保持不变。"},
    "volume_at_cap": {"en": "The volume is already at its limit.", "zh": "音量已到上限。"},
    "volume_capped_night": {"en": "Night quiet: volume limited to {level}.", "zh": "夜间静音，音量限制在{level}。"},
    "volume_set": {"en": "Volume set to {level}.", "zh": "音量调到{level}。"},
    "music_on": {"en": "Playing music.", "zh": "正在播放音乐。"},
    "music_calm": {"en": "You sound stressed, so calm music and soft light.", "zh": "听起来你有些紧张，放点舒缓音乐。"},
    "media_paused": {"en": "Media paused.", "zh": "已暂停播放。"},
    "deny_video": {"en": "Video is not permitted in this car.", "zh": "此车不允许播放视频。"},
    "no_video_driving": {"en": "No video on the driver screen while driving.", "zh": "行驶中主驾屏不能播放视频。"},
    "video_on": {"en": "Video on {screen}.", "zh": "在{screen}播放视频。"},
    "deny_windows": {"en": "Window control is not permitted.", "zh": "车窗控制未获许可。"},
    "deny_apps": {"en": "Apps are not permitted here.", "zh": "应用未获许可。"},
    "deny_fragrance": {"en": "Fragrance is not permitted.", "zh": "香氛未获许可。"},
    "polluted_outside": {"en": "The outside air is polluted, so windows stay closed.",
                         "zh": "外面空气污染严重，车窗保持关闭。"},
    "privacy_meeting": {"en": "Windows stay closed during a private meeting.", "zh": "私密会议中车窗保持关闭。"},
    "window_open": {"en": "Opened the {win} window a little.", "zh": "{win}车窗已打开一点。"},
    "child_window": {"en": "The window by the child seat opens no further.", "zh": "儿童座椅旁的车窗不能再开了。"},
    "windows_closed": {"en": "All windows closed.", "zh": "车窗已全部关闭。"},
    "sunshade_open": {"en": "Sunshade opened.", "zh": "遮阳帘已打开。"},
    "sunshade_closed": {"en": "Sunshade closed.", "zh": "遮阳帘已关闭。"},
    "dark_light_on": {"en": "It is dark, so the reading light is on.", "zh": "车内较暗，已打开阅读灯。"},
    "bright_open_shade": {"en": "Opened the sunshade to let daylight in.", "zh": "打开遮阳帘让阳光进来。"},
    "already_bright": {"en": "The cabin is already bright.", "zh": "车内已经很亮了。"},
    "ambient_color": {"en": "Ambient light set to {color}.", "zh": "氛围灯已换成{color}。"},
    "fragrance_on": {"en": "Fragrance set to {scent}.", "zh": "{scent}香氛已打开。"},
    "navigate": {"en": "Navigating {dest}.", "zh": "正在导航到{dest}。"},
    "child_asleep": {"en": "The child in the {seat} is asleep: quiet and dark.", "zh": "{seat}的孩子睡着了，保持安静。"},
    "no_child": {"en": "I don't see a child in the car.", "zh": "车里没有看到孩子。"},
    "already_quiet": {"en": "It is already quiet for the child.", "zh": "车内已经很安静了。"},
    "relax_stressed": {"en": "You sound stressed, so relax mode is on.", "zh": "听起来你很疲惫，已开启放松模式。"},
    "chat": {"en": "Just chatting, no action needed.", "zh": "只是聊天，无需操作。"},
    "no_meeting": {"en": "No meeting is running.", "zh": "当前没有会议。"},
    "meeting_end": {"en": "Meeting ended.", "zh": "会议已结束。"},
    "ambiguous": {"en": "Not sure what that refers to, nothing changed.", "zh": "不确定指的是什么，未做更改。"},
    "turned_off": {"en": "Turned it off.", "zh": "已关闭。"},
    "nothing_to_undo": {"en": "Nothing to undo.", "zh": "没有可撤销的操作。"},
    "undone": {"en": "Restored the previous settings.", "zh": "已恢复之前的设置。"},
    "undone_guarded": {"en": "Restored what the rules allow now.", "zh": "已在规则允许范围内恢复设置。"},
    "scene_already": {"en": "{scene} is already set.", "zh": "{scene}已经开启。"},
    "no_nap_driving": {"en": "The driver cannot nap while driving.", "zh": "行驶中驾驶员不能小憩。"},
    "scene_cinema": {"en": "Cinema mode: shades closed, lights dimmed, video on {screen}.",
                     "zh": "影院模式：关遮阳帘，调暗灯光，在{screen}播放。"},
    "scene_meeting": {"en": "Meeting mode: media paused, windows closed, meeting started.",
                      "zh": "会议模式：暂停媒体，关窗，开始会议。"},
    "scene_nap": {"en": "Nap mode: seat reclined, lights off, white noise and an alarm.",
                  "zh": "小憩模式：放倒座椅，关灯，白噪音，设闹钟。"},
    "scene_welcome": {"en": "Welcome mode: climate ready, {light}.", "zh": "迎宾模式：空调就绪，{light}。"},
    "scene_purify": {"en": "Purify mode: windows closed, recirculation and purifier on.",
                     "zh": "净化模式：关窗，内循环，开启净化器。"},
    "scene_purify_quiet": {"en": "Quiet purify: windows closed, purifier on low.", "zh": "安静净化：关窗，净化器低档运行。"},
    "scene_relax": {"en": "Relax mode: blue light, massage and calm music.", "zh": "放松模式：蓝色灯光，按摩，舒缓音乐。"},
    "scene_ventilate": {"en": "Ventilation: fresh air in.", "zh": "通风模式：引入新鲜空气。"},
    "scene_defog": {"en": "Defog: air on the windshield at high fan.", "zh": "除雾模式：吹前挡风，加大风量。"},
}

CAPTIONS: dict[str, dict[str, str]] = {
    "dark": {"en": "Dark cabin.", "zh": "车内很暗。"},
    "bright": {"en": "Bright cabin.", "zh": "车内明亮。"},
    "adult": {"en": "An adult in the {seat}.", "zh": "{seat}有成人。"},
    "adult_asleep": {"en": "Someone asleep in the {seat}.", "zh": "{seat}有人睡着了。"},
    "child": {"en": "A child seat in the {seat}.", "zh": "{seat}有儿童座椅。"},
    "child_asleep": {"en": "A child asleep in the {seat}.", "zh": "{seat}的孩子睡着了。"},
    "rear_empty": {"en": "Empty rear seats.", "zh": "后排没有人。"},
}


def _fill(template: str, language: str, args: dict) -> str:
    """Format a template, rendering code-valued slots (seat, color, ...) in `language`."""
    vals = {}
    for k, v in args.items():
        table = SLOT_TABLES.get(k)
        vals[k] = table[language][v] if table else v
    if "seat" in args and "win" not in vals:
        vals["win"] = WINDOW[language][args["seat"]]
    out = template.format(**vals)
    return out[0].upper() + out[1:] if language == "en" and out else out


def utterance_options(request_type: str, slots: dict, language: str) -> list[str]:
    """Every paraphrase `utterance` may say for this request, in template order."""
    key = request_type
    for slot in ("seat", "scent", "delta"):
        if slots.get(slot) is not None and f"{request_type}+{slot}" in UTTERANCES:
            key = f"{request_type}+{slot}"
    return [_fill(t, language, slots) for t in UTTERANCES[key][language]]


def utterance(request_type: str, slots: dict, language: str, rng: np.random.Generator) -> str:
    """A paraphrase of a request in `language`; slots named in the template are spoken."""
    options = utterance_options(request_type, slots, language)
    return options[int(rng.integers(len(options)))]


def explanation(key: str, args: dict, language: str) -> str:
    """The explanation text of a policy answer."""
    return _fill(EXPLANATIONS[key][language], language, args)


def caption(facts: list[tuple[str, dict]], language: str) -> str:
    """Join caption facts, e.g. [("dark", {}), ("child", {"seat": "rear_left"})]."""
    sep = " " if language == "en" else ""
    return sep.join(_fill(CAPTIONS[k][language], language, a) for k, a in facts)


def all_strings() -> list[str]:
    """Every template with every slot value filled in (the tokenizer's coverage corpus)."""
    out = []
    fillers = {"temp": [str(t) for t in range(16, 29)], "level": [str(v) for v in range(11)]}
    for lang in LANGUAGES:
        for table in (UTTERANCES, EXPLANATIONS, CAPTIONS):
            for entry in table.values():
                for tpl in (entry[lang] if isinstance(entry[lang], tuple) else (entry[lang],)):
                    out += _expand(tpl, lang, fillers)
    return out


def _expand(tpl: str, lang: str, fillers: dict) -> list[str]:
    slots = [k for k in list(SLOT_TABLES) + list(fillers) if "{" + k + "}" in tpl]
    if not slots:
        return [_fill(tpl, lang, {})]
    out = []
    for k in slots:  # one slot at a time with every value, others at their first value
        values = list(SLOT_TABLES[k][lang]) if k in SLOT_TABLES else fillers[k]
        for v in values:
            args = {s: (list(SLOT_TABLES[s][lang])[0] if s in SLOT_TABLES else fillers[s][0]) for s in slots}
            args[k] = v
            out.append(_fill(tpl, lang, args))
    return out
